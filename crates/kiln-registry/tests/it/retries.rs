//! Retries through a flaky proxy in front of the registry.

use kiln_registry::{Credentials, RegistryClient, RegistryError, RegistryOptions};
use kiln_testutil::{Fault, FlakyProxy, Registry};

use crate::{push_small, r};

fn via(proxy: &FlakyProxy, attempts: u32) -> RegistryClient {
    RegistryClient::new(
        RegistryOptions { insecure: vec![proxy.host.clone()], attempts, ..Default::default() },
        Credentials::anonymous(),
    )
    .unwrap()
}

#[test]
fn transient_failures_are_retried_as_configured() {
    let reg = Registry::start();
    let direct = crate::client(&reg, Credentials::anonymous(), 64 << 20);
    let (digest, layers) = push_small(&direct, &r(&format!("{}/flaky/app:1", reg.host)), 1);

    // 503, 429 (Retry-After: 1), a dropped connection, then the answer: 4 attempts.
    let proxy = FlakyProxy::start(
        &reg.host,
        vec![Fault::Unavailable, Fault::TooManyRequests { retry_after: 1 }, Fault::Drop],
    );
    let c = via(&proxy, 4);
    let image = r(&format!("{}/flaky/app:1", proxy.host));
    let started = std::time::Instant::now();
    assert_eq!(c.get_manifest(&image).unwrap().2, digest);
    assert_eq!(proxy.requests(), 4);
    assert!(started.elapsed() >= std::time::Duration::from_secs(1), "Retry-After honoured");
    // Later requests go straight through.
    let dir = tempfile::tempdir().unwrap();
    c.get_blob(&image, &layers[0], &dir.path().join("l")).unwrap();
    assert_eq!(proxy.requests(), 5);

    // A blob download whose connection drops is retried too.
    let proxy = FlakyProxy::start(&reg.host, vec![Fault::Drop, Fault::Unavailable]);
    let c = via(&proxy, 3);
    let image = r(&format!("{}/flaky/app:1", proxy.host));
    c.get_blob(&image, &layers[0], &dir.path().join("l2")).unwrap();
    assert_eq!(proxy.requests(), 3);
}

#[test]
fn exhausted_retries_say_so() {
    let reg = Registry::start();
    let proxy = FlakyProxy::start(&reg.host, vec![Fault::Unavailable; 10]);
    let c = via(&proxy, 3);
    let err = c.get_manifest(&r(&format!("{}/flaky/app:1", proxy.host))).unwrap_err();
    assert!(matches!(err, RegistryError::RetriesExhausted { attempts: 3, .. }), "{err}");
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(proxy.requests(), 3);

    let proxy = FlakyProxy::start(&reg.host, vec![Fault::Drop; 10]);
    let c = via(&proxy, 2);
    let err = c.get_manifest(&r(&format!("{}/flaky/app:1", proxy.host))).unwrap_err();
    assert!(err.to_string().contains("after 2 attempts"), "{err}");
    assert_eq!(proxy.requests(), 2);

    // One attempt: no retry.
    let proxy = FlakyProxy::start(&reg.host, vec![Fault::Unavailable]);
    let c = via(&proxy, 1);
    assert!(c.get_manifest(&r(&format!("{}/flaky/app:1", proxy.host))).is_err());
    assert_eq!(proxy.requests(), 1);
}
