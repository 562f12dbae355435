//! [`ImageConfig`]: the image configuration (OCI `application/vnd.oci.image.config.v1+json`
//! and Docker `application/vnd.docker.container.image.v1+json`, which is a superset).
//!
//! Every field either spec defines is typed: platform fields, `created`, `author`,
//! [`ContainerConfig`] (including the Docker-only `Healthcheck`, `OnBuild` and `Shell`),
//! [`RootFs`] and [`History`]. Fields kiln does not know (`container_config`, `docker_version`,
//! `Hostname`, …) are kept in the `extra` maps so a base image's config survives a round trip.
//! Serialisation is deterministic: spec field order, then unknown fields sorted by name.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::manifest::ManifestError;
use crate::platform::Platform;

/// The image configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(rename = "os.version", default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ContainerConfig>,
    #[serde(default)]
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The execution parameters (`config` in the image config). Docker's capitalised field names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `"80/tcp"`-style keys; serialised as an object of empty objects.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "object_set")]
    pub exposed_ports: Option<BTreeSet<String>>,
    /// `KEY=value` strings, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "object_set")]
    pub volumes: Option<BTreeSet<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_escaped: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Docker's `HEALTHCHECK`. Durations are nanoseconds; zero means "inherit".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `[]` inherit, `["NONE"]` disable, `["CMD", args…]`, `["CMD-SHELL", command]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: i64,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The layer DiffIDs: digests of the uncompressed layer tars, bottom first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs { kind: "layers".to_owned(), diff_ids: Vec::new(), extra: BTreeMap::new() }
    }
}

/// One entry of the build history. `empty_layer` entries have no layer in `rootfs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl ImageConfig {
    /// Parses a config blob.
    pub fn from_slice(bytes: &[u8]) -> Result<ImageConfig, ManifestError> {
        serde_json::from_slice(bytes)
            .map_err(|source| ManifestError::Json { what: "image config", source })
    }

    /// Serialises deterministically (compact JSON).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The platform this config declares.
    pub fn platform(&self) -> Platform {
        Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            os_version: self.os_version.clone(),
            os_features: self.os_features.clone(),
            variant: self.variant.clone(),
            features: Vec::new(),
        }
    }

    /// Sets architecture, OS and variant (and OS version/features) from `platform`.
    pub fn set_platform(&mut self, platform: &Platform) {
        self.architecture.clone_from(&platform.architecture);
        self.os.clone_from(&platform.os);
        self.os_version.clone_from(&platform.os_version);
        self.os_features.clone_from(&platform.os_features);
        self.variant.clone_from(&platform.variant);
    }

    /// The execution parameters, created empty if absent.
    pub fn config_mut(&mut self) -> &mut ContainerConfig {
        self.config.get_or_insert_with(ContainerConfig::default)
    }

    /// Number of history entries that correspond to a layer.
    pub fn non_empty_history_len(&self) -> usize {
        self.history.iter().filter(|h| !h.empty_layer).count()
    }
}

/// `{"a": {}, "b": {}}` ⇄ `{"a", "b"}`; values other than `{}` are ignored on read
/// (Docker and OCI only ever write empty objects there).
mod object_set {
    use std::collections::{BTreeMap, BTreeSet};

    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)] // serde's `with` passes `&Option<T>`
    pub fn serialize<S: Serializer>(
        set: &Option<BTreeSet<String>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let empty = serde_json::Map::new();
        match set {
            Some(set) => s.collect_map(set.iter().map(|k| (k, &empty))),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<BTreeSet<String>>, D::Error> {
        let map: Option<BTreeMap<String, serde::de::IgnoredAny>> = Option::deserialize(d)?;
        Ok(map.map(|m| m.into_keys().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config as `docker build` writes it (trimmed): Docker-only fields, legacy
    /// `container_config`, nulls, and history with empty layers.
    const DOCKER_CONFIG: &str = r##"{
  "architecture": "amd64",
  "config": {
    "Hostname": "",
    "Domainname": "",
    "User": "app",
    "AttachStdin": false,
    "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
    "Tty": false,
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "A=1"],
    "Cmd": ["/bin/sh", "-c", "serve"],
    "Healthcheck": {"Test": ["CMD-SHELL", "wget -q -O- localhost:8080/health"], "Interval": 30000000000, "Timeout": 3000000000, "StartPeriod": 5000000000, "StartInterval": 1000000000, "Retries": 3},
    "ArgsEscaped": true,
    "Image": "sha256:9b1e0f8a2b5c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789",
    "Volumes": {"/data": {}},
    "WorkingDir": "/srv",
    "Entrypoint": null,
    "OnBuild": ["RUN echo child"],
    "Labels": {"org.opencontainers.image.source": "https://example.com/repo"},
    "StopSignal": "SIGQUIT",
    "Shell": ["/bin/bash", "-c"]
  },
  "container": "3f1c0d2e",
  "container_config": {"Hostname": "3f1c0d2e", "Cmd": ["/bin/sh", "-c", "#(nop) CMD [\"serve\"]"]},
  "created": "2024-05-01T12:00:00.123456789Z",
  "docker_version": "24.0.7",
  "history": [
    {"created": "2024-04-01T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD file:abc in / "},
    {"created": "2024-04-01T00:00:01Z", "created_by": "/bin/sh -c #(nop)  CMD [\"sh\"]", "empty_layer": true},
    {"created": "2024-05-01T12:00:00Z", "created_by": "RUN /bin/sh -c make", "comment": "buildkit.dockerfile.v0", "author": "me"}
  ],
  "os": "linux",
  "rootfs": {
    "type": "layers",
    "diff_ids": [
      "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
      "sha256:a416a98b71e224a31ee99cff8e16063554498227d2b696152a9c3e0aa65e5824"
    ]
  }
}"##;

    #[test]
    fn parses_every_docker_field() {
        let c = ImageConfig::from_slice(DOCKER_CONFIG.as_bytes()).unwrap();
        assert_eq!(c.platform().to_string(), "linux/amd64");
        assert_eq!(c.created.as_deref(), Some("2024-05-01T12:00:00.123456789Z"));
        let cc = c.config.as_ref().unwrap();
        assert_eq!(cc.user.as_deref(), Some("app"));
        let ports: Vec<&str> =
            cc.exposed_ports.as_ref().unwrap().iter().map(String::as_str).collect();
        assert_eq!(ports, ["53/udp", "8080/tcp"]);
        assert_eq!(cc.entrypoint, None);
        assert_eq!(cc.shell.as_deref(), Some(&["/bin/bash".to_owned(), "-c".to_owned()][..]));
        assert_eq!(cc.on_build.as_ref().unwrap()[0], "RUN echo child");
        let hc = cc.healthcheck.as_ref().unwrap();
        assert_eq!(
            (hc.interval, hc.timeout, hc.start_period, hc.start_interval, hc.retries),
            (30_000_000_000, 3_000_000_000, 5_000_000_000, 1_000_000_000, 3)
        );
        assert_eq!(cc.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(cc.args_escaped, Some(true));
        assert_eq!(cc.extra["Hostname"], "");
        assert_eq!(c.extra["docker_version"], "24.0.7");
        assert!(c.extra.contains_key("container_config"));
        assert_eq!(c.rootfs.diff_ids.len(), 2);
        assert_eq!(c.history.len(), 3);
        assert_eq!(c.non_empty_history_len(), 2);
        assert_eq!(c.history[2].comment.as_deref(), Some("buildkit.dockerfile.v0"));
    }

    #[test]
    fn round_trip_keeps_all_data_and_is_stable() {
        let c = ImageConfig::from_slice(DOCKER_CONFIG.as_bytes()).unwrap();
        let once = c.to_json();
        let again = ImageConfig::from_slice(&once).unwrap();
        assert_eq!(c, again);
        assert_eq!(once, again.to_json(), "serialising twice gives the same bytes");
        // Semantically equal to the input: only nulls are dropped.
        let mut input: serde_json::Value = serde_json::from_str(DOCKER_CONFIG).unwrap();
        input["config"].as_object_mut().unwrap().remove("Entrypoint");
        let output: serde_json::Value = serde_json::from_slice(&once).unwrap();
        assert_eq!(input, output);
    }

    #[test]
    fn minimal_oci_config() {
        let json = r#"{"architecture":"arm64","os":"linux","variant":"v8","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = ImageConfig::from_slice(json.as_bytes()).unwrap();
        assert_eq!(c.platform().to_string(), "linux/arm64/v8");
        assert_eq!(String::from_utf8(c.to_json()).unwrap(), json);
    }

    #[test]
    fn building_a_config_from_scratch() {
        let mut c = ImageConfig::default();
        c.set_platform(&"linux/arm/v7".parse().unwrap());
        let cc = c.config_mut();
        cc.exposed_ports = Some(BTreeSet::from(["80/tcp".to_owned()]));
        cc.healthcheck = Some(Healthcheck { test: vec!["NONE".into()], ..Healthcheck::default() });
        c.rootfs.diff_ids.push(Digest::sha256_of(b""));
        c.history.push(History { created_by: Some("COPY . /".into()), ..History::default() });
        let text = String::from_utf8(c.to_json()).unwrap();
        assert_eq!(
            text,
            r#"{"architecture":"arm","os":"linux","variant":"v7","config":{"ExposedPorts":{"80/tcp":{}},"Healthcheck":{"Test":["NONE"]}},"rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},"history":[{"created_by":"COPY . /"}]}"#
        );
    }

    #[test]
    fn malformed_config_is_an_error() {
        let err =
            ImageConfig::from_slice(b"{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"x\"]}}")
                .unwrap_err();
        assert!(err.to_string().contains("image config"), "{err}");
    }
}
