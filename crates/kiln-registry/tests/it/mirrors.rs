//! Registry mirrors for Docker Hub (`--registry-mirror`) and other registries
//! (`--registry-map`), with and without falling back to the registry itself. No test here
//! reaches Docker Hub: the mirror has the image, or the fallback is off.

use kiln_registry::{Credentials, RegistryClient, RegistryError, RegistryOptions};
use kiln_testutil::Registry;

use crate::{pull_all, push_small, r};

#[test]
fn docker_hub_pulls_come_from_the_mirror() {
    let empty = Registry::start();
    let mirror = Registry::start();
    let setup = crate::client(&mirror, Credentials::anonymous(), 64 << 20);
    let (digest, _) = push_small(&setup, &r(&format!("{}/library/busybox:latest", mirror.host)), 2);

    let options = RegistryOptions {
        insecure: vec![empty.host.clone(), mirror.host.clone()],
        // The first mirror lacks the image; the second has it.
        mirrors: vec![empty.host.clone(), mirror.host.clone()],
        skip_default_registry_fallback: true,
        ..Default::default()
    };
    let c = RegistryClient::new(options.clone(), Credentials::anonymous()).unwrap();
    let hub = r("busybox");
    assert_eq!(hub.registry, "docker.io");
    let pulled = pull_all(&c, &hub);
    assert_eq!(pulled.digest, digest);
    assert_eq!(c.source_of(&hub), mirror.host);

    // With the fallback on, the mirror that has the image still serves it (the default
    // registry is never asked, or this test would need the internet).
    let c = RegistryClient::new(
        RegistryOptions {
            skip_default_registry_fallback: false,
            mirrors: vec![mirror.host.clone()],
            ..options.clone()
        },
        Credentials::anonymous(),
    )
    .unwrap();
    assert_eq!(pull_all(&c, &r("docker.io/library/busybox:latest")).digest, digest);
    assert_eq!(c.source_of(&hub), mirror.host);

    // No mirror has it and the fallback is off: the error names the mirrors tried.
    let c = RegistryClient::new(
        RegistryOptions { mirrors: vec![empty.host.clone()], ..options },
        Credentials::anonymous(),
    )
    .unwrap();
    let err = c.get_manifest(&r("alpine:3")).unwrap_err();
    assert!(matches!(err, RegistryError::MirrorsFailed { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("docker.io/library/alpine:3") && text.contains(&empty.host), "{text}");
    assert!(err.hint().unwrap().contains("--skip-default-registry-fallback"));
}

#[test]
fn registry_map_with_a_path_prefix() {
    let mirror = Registry::start();
    let setup = crate::client(&mirror, Credentials::anonymous(), 64 << 20);
    let (digest, _) = push_small(&setup, &r(&format!("{}/cache/team/app:1", mirror.host)), 1);
    let map = kiln_registry::client::parse_registry_map(&format!(
        "registry.invalid={}/cache;index.docker.io={}",
        mirror.host, mirror.host
    ))
    .unwrap();
    assert_eq!(map[1].0, "docker.io");
    let c = RegistryClient::new(
        RegistryOptions {
            insecure: vec![mirror.host.clone()],
            registry_map: map,
            skip_default_registry_fallback: true,
            ..Default::default()
        },
        Credentials::anonymous(),
    )
    .unwrap();
    let src = r("registry.invalid/team/app:1");
    assert_eq!(pull_all(&c, &src).digest, digest);
    assert_eq!(c.source_of(&src), mirror.host);
    assert!(kiln_registry::client::parse_registry_map("no-equals-sign").is_err());
}
