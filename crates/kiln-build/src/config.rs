//! The image configuration a build edits: the base image's config JSON, changed by each
//! instruction as BuildKit changes it, with every field kiln does not know kept as it was.
//!
//! [`ImageConfig`] wraps the JSON document (Docker/OCI field names: `config.Env`,
//! `config.Labels`, `rootfs.diff_ids`, `history`, ...). Editing the document rather than a
//! typed struct is deliberate: a base image's config may carry fields newer than kiln, and they
//! must survive into the result. Serialisation sorts keys, so the same edits give the same
//! bytes and the same digest.

use serde_json::{Map, Value, json};

use crate::run::DEFAULT_PATH;

/// An image configuration being built.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    doc: Value,
}

/// Why a config document is unusable.
#[derive(Debug, thiserror::Error)]
#[error("the image config is not valid JSON for an image: {reason}")]
pub struct ConfigError {
    reason: String,
}

/// A history entry, as the engine records one per instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub created_by: String,
    pub empty_layer: bool,
    /// RFC 3339.
    pub created: Option<String>,
}

impl ImageConfig {
    /// The config of `FROM scratch`: the platform, and Docker's default `PATH` (as BuildKit).
    pub fn scratch(os: &str, architecture: &str, variant: Option<&str>) -> ImageConfig {
        let mut doc = json!({
            "architecture": architecture,
            "os": os,
            "config": { "Env": [format!("PATH={DEFAULT_PATH}")] },
            "rootfs": { "type": "layers", "diff_ids": [] },
        });
        if let (Some(v), Some(obj)) = (variant, doc.as_object_mut()) {
            obj.insert("variant".into(), Value::String(v.to_owned()));
        }
        ImageConfig { doc }
    }

    /// Reads a base image's config.
    pub fn from_json(bytes: &[u8]) -> Result<ImageConfig, ConfigError> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError { reason: e.to_string() })?;
        if !doc.is_object() {
            return Err(ConfigError { reason: "the document is not a JSON object".into() });
        }
        let mut cfg = ImageConfig { doc };
        // Images built for scratch by some tools have no rootfs; make the shape complete.
        let rootfs = cfg.root_mut().entry("rootfs").or_insert_with(|| json!({"type": "layers"}));
        if let Some(r) = rootfs.as_object_mut() {
            r.entry("diff_ids").or_insert_with(|| json!([]));
        }
        Ok(cfg)
    }

    /// The serialised document (sorted keys).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.doc).unwrap_or_default()
    }

    /// The whole document.
    pub fn document(&self) -> &Value {
        &self.doc
    }

    fn root_mut(&mut self) -> &mut Map<String, Value> {
        ensure_object(&mut self.doc)
    }

    /// The `config` object (the container defaults), created if missing or null.
    fn container_mut(&mut self) -> &mut Map<String, Value> {
        ensure_object(self.root_mut().entry("config").or_insert(Value::Null))
    }

    fn container(&self) -> Option<&Map<String, Value>> {
        self.doc.get("config").and_then(Value::as_object)
    }

    fn strings(&self, key: &str) -> Vec<String> {
        self.container()
            .and_then(|c| c.get(key))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// `config.Env`.
    pub fn env(&self) -> Vec<String> {
        self.strings("Env")
    }

    /// The value of one variable of `config.Env`.
    pub fn env_var(&self, name: &str) -> Option<String> {
        self.env().into_iter().find_map(|e| match e.split_once('=') {
            Some((k, v)) if k == name => Some(v.to_owned()),
            _ => None,
        })
    }

    /// Sets a variable of `config.Env`, in place if it exists.
    pub fn set_env(&mut self, name: &str, value: &str) {
        let mut env = self.env();
        let entry = format!("{name}={value}");
        match env.iter_mut().find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == name) {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
        self.container_mut().insert("Env".into(), json!(env));
    }

    /// `config.User`.
    pub fn user(&self) -> String {
        self.container()
            .and_then(|c| c.get("User"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    }

    pub fn set_user(&mut self, user: &str) {
        self.container_mut().insert("User".into(), json!(user));
    }

    /// `config.WorkingDir` (`/` when unset).
    pub fn workdir(&self) -> String {
        match self.container().and_then(|c| c.get("WorkingDir")).and_then(Value::as_str) {
            Some(w) if !w.is_empty() => w.to_owned(),
            _ => "/".to_owned(),
        }
    }

    pub fn set_workdir(&mut self, dir: &str) {
        self.container_mut().insert("WorkingDir".into(), json!(dir));
    }

    /// `config.Shell`, empty when unset.
    pub fn shell(&self) -> Vec<String> {
        self.strings("Shell")
    }

    pub fn set_shell(&mut self, shell: &[String]) {
        self.container_mut().insert("Shell".into(), json!(shell));
    }

    /// Sets `config.Cmd` (`None` clears it) and, as BuildKit does, `ArgsEscaped`.
    pub fn set_cmd(&mut self, cmd: Option<&[String]>) {
        let c = self.container_mut();
        match cmd {
            Some(cmd) => {
                c.insert("Cmd".into(), json!(cmd));
                c.insert("ArgsEscaped".into(), json!(true));
            }
            None => {
                c.insert("Cmd".into(), Value::Null);
            }
        }
    }

    /// `config.Cmd`.
    pub fn cmd(&self) -> Option<Vec<String>> {
        self.container()
            .and_then(|c| c.get("Cmd"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
    }

    /// `config.Entrypoint`.
    pub fn entrypoint(&self) -> Option<Vec<String>> {
        self.container()
            .and_then(|c| c.get("Entrypoint"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
    }

    pub fn set_entrypoint(&mut self, entrypoint: &[String]) {
        self.container_mut().insert("Entrypoint".into(), json!(entrypoint));
    }

    fn object_entry(&mut self, key: &str) -> &mut Map<String, Value> {
        ensure_object(self.container_mut().entry(key).or_insert(Value::Null))
    }

    pub fn set_label(&mut self, key: &str, value: &str) {
        self.object_entry("Labels").insert(key.to_owned(), json!(value));
    }

    /// `config.Labels`.
    pub fn labels(&self) -> Vec<(String, String)> {
        self.container()
            .and_then(|c| c.get("Labels"))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned())).collect()
            })
            .unwrap_or_default()
    }

    /// Adds `port` (`80`, `80/tcp`, `53/udp`) to `config.ExposedPorts`.
    pub fn expose(&mut self, port: &str) {
        self.object_entry("ExposedPorts").insert(port.to_owned(), json!({}));
    }

    pub fn add_volume(&mut self, path: &str) {
        self.object_entry("Volumes").insert(path.to_owned(), json!({}));
    }

    pub fn set_stop_signal(&mut self, signal: &str) {
        self.container_mut().insert("StopSignal".into(), json!(signal));
    }

    pub fn add_onbuild(&mut self, expression: &str) {
        let mut triggers = self.onbuild();
        triggers.push(expression.to_owned());
        self.container_mut().insert("OnBuild".into(), json!(triggers));
    }

    /// `config.OnBuild`: triggers a child image runs after its FROM.
    pub fn onbuild(&self) -> Vec<String> {
        self.strings("OnBuild")
    }

    /// Clears the triggers (a child image does not inherit its parent's).
    pub fn clear_onbuild(&mut self) {
        self.container_mut().insert("OnBuild".into(), Value::Null);
    }

    /// Sets `config.Healthcheck`; durations in nanoseconds as Docker stores them.
    pub fn set_healthcheck(&mut self, healthcheck: Value) {
        self.container_mut().insert("Healthcheck".into(), healthcheck);
    }

    pub fn set_author(&mut self, author: &str) {
        self.root_mut().insert("author".into(), json!(author));
    }

    /// `created`, RFC 3339.
    pub fn set_created(&mut self, created: &str) {
        self.root_mut().insert("created".into(), json!(created));
    }

    /// `rootfs.diff_ids`.
    pub fn diff_ids(&self) -> Vec<String> {
        self.doc
            .get("rootfs")
            .and_then(|r| r.get("diff_ids"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    pub fn push_diff_id(&mut self, diff_id: &str) {
        let mut ids = self.diff_ids();
        ids.push(diff_id.to_owned());
        self.root_mut().insert("rootfs".into(), json!({ "type": "layers", "diff_ids": ids }));
    }

    /// Appends a history entry.
    pub fn push_history(&mut self, entry: &HistoryEntry) {
        let mut h = Map::new();
        if let Some(created) = &entry.created {
            h.insert("created".into(), json!(created));
        }
        h.insert("created_by".into(), json!(entry.created_by));
        h.insert("comment".into(), json!("buildkit.dockerfile.v0"));
        if entry.empty_layer {
            h.insert("empty_layer".into(), json!(true));
        }
        let history = self.root_mut().entry("history").or_insert_with(|| json!([]));
        if !history.is_array() {
            *history = json!([]);
        }
        if let Value::Array(a) = history {
            a.push(Value::Object(h));
        }
    }

    /// The history entries' `created_by`, for tests and inspection.
    pub fn history(&self) -> Vec<(String, bool)> {
        self.doc
            .get("history")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|h| {
                        (
                            h.get("created_by").and_then(Value::as_str).unwrap_or("").to_owned(),
                            h.get("empty_layer").and_then(Value::as_bool).unwrap_or(false),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `os`, `architecture`, `variant`.
    pub fn platform(&self) -> (String, String, Option<String>) {
        let get = |k: &str| self.doc.get(k).and_then(Value::as_str).map(str::to_owned);
        (
            get("os").unwrap_or_else(|| "linux".into()),
            get("architecture").unwrap_or_else(|| "amd64".into()),
            get("variant"),
        )
    }
}

/// Makes `slot` an object (replacing `null` or a malformed value) and returns it.
fn ensure_object(slot: &mut Value) -> &mut Map<String, Value> {
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(m) => m,
        // Made an object just above.
        _ => unreachable!(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn scratch_has_path_and_platform() {
        let c = ImageConfig::scratch("linux", "arm64", Some("v8"));
        assert_eq!(c.env_var("PATH").as_deref(), Some(DEFAULT_PATH));
        assert_eq!(c.platform(), ("linux".into(), "arm64".into(), Some("v8".into())));
        assert_eq!(c.workdir(), "/");
        assert!(c.diff_ids().is_empty());
    }

    #[test]
    fn edits_keep_unknown_fields_and_are_deterministic() {
        let base = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","A=1"],"Cmd":["sh"],"X-Future":{"k":1}},"rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"moby.buildkit.buildinfo.v1":"e30="}"#;
        let mut c = ImageConfig::from_json(base).unwrap();
        c.set_env("A", "2");
        c.set_env("B", "3");
        c.set_label("org.opencontainers.image.title", "t");
        c.expose("80/tcp");
        c.set_entrypoint(&["/entry".into()]);
        c.set_cmd(None);
        c.push_diff_id("sha256:bb");
        c.push_history(&HistoryEntry {
            created_by: "ENV A=2".into(),
            empty_layer: true,
            created: None,
        });
        assert_eq!(c.env(), ["PATH=/bin", "A=2", "B=3"]);
        assert_eq!(c.diff_ids(), ["sha256:aa", "sha256:bb"]);
        assert_eq!(c.cmd(), None);
        assert_eq!(c.history(), vec![("ENV A=2".to_owned(), true)]);
        let doc = c.document();
        assert_eq!(doc["config"]["X-Future"]["k"], 1);
        assert_eq!(doc["moby.buildkit.buildinfo.v1"], "e30=");
        let again = ImageConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(again.to_json(), c.to_json());
        assert!(ImageConfig::from_json(b"[1]").is_err());
        assert!(ImageConfig::from_json(b"{").is_err());
    }
}
