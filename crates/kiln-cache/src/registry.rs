//! A cache in a registry repository (kaniko's `--cache-repo`): one small image per key,
//! tagged with the key. Its config's `created` time is the entry's age (for `--cache-ttl`);
//! it has the step's layer, or no layer for a step that changed nothing (marked by a label).
//! A hit's blob is mounted into the destination repository when it is on the same registry,
//! so it is never uploaded again.

use std::path::Path;
use std::time::{Duration, SystemTime};

use kiln_oci::{Descriptor, Digest};
use kiln_reference::Reference;
use kiln_registry::{RegistryClient, RegistryError};

use crate::{CacheEntry, CacheError, CacheKey, CachedLayer, LayerCache, now_secs};

const EMPTY_LABEL: &str = "dev.kiln.cache.empty";
const CREATED_ANNOTATION: &str = "dev.kiln.cache.created";
const DIFF_ID_ANNOTATION: &str = "dev.kiln.cache.diff-id";

/// The entry an OCI cache manifest describes in its annotations (written by `put` since
/// they exist); `None` for an older entry or a Docker-type manifest, read from its config.
fn from_annotations(bytes: &[u8], media_type: &str) -> Option<CacheEntry> {
    if media_type != kiln_oci::media_type::OCI_MANIFEST {
        return None;
    }
    let Ok(kiln_oci::manifest::Manifest::Image(m)) =
        kiln_oci::manifest::Manifest::from_slice(bytes, Some(media_type))
    else {
        return None;
    };
    let note = |key: &str| m.annotations.get(key).map(String::as_str);
    let created = parse_rfc3339(note(CREATED_ANNOTATION)?)?;
    let layer = match (note(EMPTY_LABEL)? == "true", m.layers.as_slice()) {
        (true, []) => None,
        (false, [d]) => Some(CachedLayer {
            digest: d.digest.to_string(),
            diff_id: note(DIFF_ID_ANNOTATION)?.to_owned(),
            size: d.size,
            media_type: d.media_type.clone(),
        }),
        _ => return None,
    };
    Some(CacheEntry { layer, created })
}

/// A layer cache in a registry repository.
pub struct RegistryCache<'a> {
    client: &'a RegistryClient,
    repo: Reference,
    ttl: Option<Duration>,
    read_only: bool,
}

impl<'a> RegistryCache<'a> {
    /// A cache in `repo` (a repository reference; a tag or digest in it is ignored).
    pub fn new(
        client: &'a RegistryClient,
        repo: &str,
        ttl: Option<Duration>,
    ) -> Result<Self, CacheError> {
        let r = Reference::parse(repo).map_err(|e| CacheError {
            cache: format!("registry {repo}"),
            message: format!("{e}"),
        })?;
        Ok(RegistryCache {
            client,
            repo: Reference { tag: None, digest: None, ..r },
            ttl,
            read_only: false,
        })
    }

    /// Reads but never writes (`--cache-from`).
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    fn tagged(&self, key: &CacheKey) -> Reference {
        self.repo.with_tag(key.as_str())
    }

    fn err(&self, e: impl std::fmt::Display) -> CacheError {
        CacheError { cache: self.describe(), message: e.to_string() }
    }
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-11-30T12:00:00Z`, fractions
/// allowed); `None` when it is not one.
fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) =
        (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + se).ok()
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

impl LayerCache for RegistryCache<'_> {
    fn describe(&self) -> String {
        format!("registry {}", self.repo.name())
    }

    fn get(&self, key: &CacheKey) -> Result<Option<CacheEntry>, CacheError> {
        let r = self.tagged(key);
        // An OCI entry says in its manifest what its config says: one request per lookup.
        let fetched = match self.client.get_manifest(&r) {
            Ok(m) => m,
            Err(RegistryError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        if let Some(entry) = from_annotations(&fetched.0, &fetched.1) {
            return Ok((!entry.expired(self.ttl, SystemTime::now())).then_some(entry));
        }
        let any = kiln_oci::Platform::new("", "", "");
        let pulled = match self.client.pull_fetched_manifest(&r, &any, fetched) {
            Ok(p) => p,
            Err(RegistryError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let config: serde_json::Value =
            serde_json::from_slice(&pulled.config).map_err(|e| self.err(format!("{r}: {e}")))?;
        let created = config["created"]
            .as_str()
            .and_then(parse_rfc3339)
            .ok_or_else(|| self.err(format!("{r}: the cache image has no creation time")))?;
        let empty = config["config"]["Labels"][EMPTY_LABEL].as_str() == Some("true");
        let diff_ids = config["rootfs"]["diff_ids"].as_array().cloned().unwrap_or_default();
        let layer = match (empty, pulled.layers.as_slice(), diff_ids.as_slice()) {
            (true, [], _) => None,
            (false, [d], [diff_id]) => Some(CachedLayer {
                digest: d.digest.to_string(),
                diff_id: diff_id.as_str().unwrap_or_default().to_owned(),
                size: d.size,
                media_type: d.media_type.clone(),
            }),
            _ => return Err(self.err(format!("{r} is not a kiln cache image"))),
        };
        let entry = CacheEntry { layer, created };
        if entry.expired(self.ttl, SystemTime::now()) {
            return Ok(None);
        }
        Ok(Some(entry))
    }

    fn fetch(&self, key: &CacheKey, layer: &CachedLayer, dest: &Path) -> Result<(), CacheError> {
        let digest: Digest = layer.digest.parse().map_err(|e| self.err(e))?;
        let d = Descriptor::new(layer.media_type.clone(), digest, layer.size);
        self.client.get_blob(&self.tagged(key), &d, dest).map_err(|e| self.err(e))
    }

    fn put(&self, key: &CacheKey, layer: Option<(&CachedLayer, &Path)>) -> Result<(), CacheError> {
        if self.read_only {
            return Ok(());
        }
        let r = self.tagged(key);
        let docker = layer.is_some_and(|(l, _)| l.media_type.contains("docker"));
        let (manifest_type, config_type) = if docker {
            (
                "application/vnd.docker.distribution.manifest.v2+json",
                "application/vnd.docker.container.image.v1+json",
            )
        } else {
            (
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.config.v1+json",
            )
        };
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        if let Some((l, path)) = layer {
            let digest: Digest = l.digest.parse().map_err(|e| self.err(e))?;
            let d = Descriptor::new(l.media_type.clone(), digest, l.size);
            self.client.push_blob(&r, &d, path).map_err(|e| self.err(e))?;
            layers.push(
                serde_json::json!({"mediaType": l.media_type, "digest": l.digest, "size": l.size}),
            );
            diff_ids.push(l.diff_id.clone());
        }
        let config = serde_json::json!({
            "created": rfc3339(now_secs()),
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {EMPTY_LABEL: if layer.is_none() { "true" } else { "false" }}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "kiln cache entry", "empty_layer": layer.is_none()}],
        });
        let config_bytes = serde_json::to_vec(&config).map_err(|e| self.err(e))?;
        let config_digest = Digest::sha256_of(&config_bytes);
        let cd = Descriptor::new(
            config_type.to_owned(),
            config_digest.clone(),
            config_bytes.len() as u64,
        );
        // From memory: an in-place build's `/` may have no /tmp.
        self.client.push_bytes(&r, &cd, &config_bytes).map_err(|e| self.err(e))?;
        let mut manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest.to_string(), "size": config_bytes.len()},
            "layers": layers,
        });
        if !docker {
            // What `get` needs from the config, where the manifest already brings it.
            manifest["annotations"] = serde_json::json!({
                CREATED_ANNOTATION: config["created"],
                EMPTY_LABEL: if layer.is_none() { "true" } else { "false" },
                DIFF_ID_ANNOTATION: layer.map(|(l, _)| l.diff_id.as_str()).unwrap_or_default(),
            });
        }
        let bytes = serde_json::to_vec(&manifest).map_err(|e| self.err(e))?;
        self.client.put_manifest(&r, &bytes, manifest_type).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn origin(&self, _key: &CacheKey) -> Option<String> {
        Some(self.repo.name())
    }

    fn write_origin(&self) -> Option<String> {
        (!self.read_only).then(|| self.repo.name())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn times_round_trip() {
        for secs in [0, 1_700_000_000, 1_795_000_123, 951_782_400] {
            assert_eq!(parse_rfc3339(&rfc3339(secs)), Some(secs), "{}", rfc3339(secs));
        }
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_rfc3339("2026-11-30T12:00:00.123456Z"), Some(1_796_040_000));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
    const LAYER_DIGEST: &str =
        "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIFF_ID: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const CONFIG_DIGEST: &str =
        "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn manifest(annotations: serde_json::Value, layers: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": CONFIG_DIGEST, "size": 2},
            "layers": layers,
            "annotations": annotations,
        }))
        .unwrap()
    }

    #[test]
    fn entries_are_read_from_manifest_annotations() {
        let layer = serde_json::json!([{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                        "digest": LAYER_DIGEST, "size": 42}]);
        let bytes = manifest(
            serde_json::json!({CREATED_ANNOTATION: "2026-11-30T12:00:00Z", EMPTY_LABEL: "false",
                               DIFF_ID_ANNOTATION: DIFF_ID}),
            layer.clone(),
        );
        let entry = from_annotations(&bytes, OCI).unwrap();
        assert_eq!(entry.created, 1_796_040_000);
        let l = entry.layer.unwrap();
        assert_eq!((l.digest.as_str(), l.diff_id.as_str(), l.size), (LAYER_DIGEST, DIFF_ID, 42));
        assert_eq!(l.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");

        let empty = manifest(
            serde_json::json!({CREATED_ANNOTATION: "2026-11-30T12:00:00Z", EMPTY_LABEL: "true",
                               DIFF_ID_ANNOTATION: ""}),
            serde_json::json!([]),
        );
        assert!(from_annotations(&empty, OCI).unwrap().layer.is_none());

        // Older entries, foreign images and Docker-type manifests go through the config.
        assert!(from_annotations(&manifest(serde_json::json!({}), layer.clone()), OCI).is_none());
        assert!(
            from_annotations(&bytes, "application/vnd.docker.distribution.manifest.v2+json")
                .is_none()
        );
        let marked_empty_with_a_layer = manifest(
            serde_json::json!({CREATED_ANNOTATION: "2026-11-30T12:00:00Z", EMPTY_LABEL: "true",
                               DIFF_ID_ANNOTATION: ""}),
            layer,
        );
        assert!(from_annotations(&marked_empty_with_a_layer, OCI).is_none());
    }
}
