//! Bearer-token auth: a registry trusting a token issuer written for the tests.

use kiln_registry::{Credentials, RegistryClient, RegistryError, RegistryOptions};
use kiln_testutil::{IssuerOptions, Registry, TokenField, TokenIssuer};

use crate::{docker_config, pull_all, push_small, r};

fn token_client(reg: &Registry, credentials: Credentials) -> RegistryClient {
    let options = RegistryOptions { insecure: vec![reg.host.clone()], ..Default::default() };
    RegistryClient::new(options, credentials).unwrap()
}

#[test]
fn tokens_per_scope_cached_and_denials_explained() {
    let issuer = TokenIssuer::start(
        IssuerOptions::default().user("ci", "push-secret", &["pull", "push"]).user(
            "reader",
            "read-secret",
            &["pull"],
        ),
    );
    let reg = Registry::start_with_token_auth(&issuer);
    let image = r(&format!("{}/team/app:1", reg.host));

    // A push of 6 blobs and a manifest asks for one pull,push token.
    let (_push_conf, push_creds) = docker_config(&reg.host, "ci", "push-secret");
    let pusher = token_client(&reg, push_creds);
    let (digest, _) = push_small(&pusher, &image, 5);
    let reqs = issuer.requests();
    assert_eq!(reqs.len(), 1, "one token for the whole push: {reqs:?}");
    assert_eq!(reqs[0].scopes, vec!["repository:team/app:pull,push".to_owned()]);
    assert_eq!(reqs[0].user.as_deref(), Some("ci"));

    // A reader pulls everything with one pull token.
    let (reader_conf, reader_creds) = docker_config(&reg.host, "reader", "read-secret");
    let reader = token_client(&reg, reader_creds);
    assert_eq!(pull_all(&reader, &image).digest, digest);
    let reqs = issuer.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].scopes, vec!["repository:team/app:pull".to_owned()]);
    assert_eq!(reqs[1].user.as_deref(), Some("reader"));

    // The reader cannot push: the error names the reference and the config file.
    let err = push_err(&reader, &r(&format!("{}/team/app:2", reg.host)));
    assert!(
        matches!(err, RegistryError::Unauthorized { .. } | RegistryError::Denied { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("team/app"), "{err}");
    let hint = err.hint().unwrap();
    assert!(hint.contains(&reader_conf.path().join("config.json").display().to_string()), "{hint}");
    assert!(!format!("{err} {hint}").contains("read-secret"));

    // Wrong password: the issuer refuses, the error says where the credentials came from.
    let (wrong_conf, wrong) = docker_config(&reg.host, "ci", "not-it");
    let err = token_client(&reg, wrong).get_manifest(&image).unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    let text = format!("{err} {}", err.hint().unwrap());
    assert!(text.contains(&wrong_conf.path().join("config.json").display().to_string()), "{text}");
    assert!(!text.contains("not-it"), "{text}");

    // Anonymous pulls are denied: 401 naming the reference, and that no credentials exist.
    let err = token_client(&reg, Credentials::anonymous()).get_manifest(&image).unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert!(err.to_string().contains(&format!("{}/team/app:1", reg.host)), "{err}");
    assert!(err.hint().unwrap().contains("no Docker config.json"), "{:?}", err.hint());
    // With a config file that has nothing for this registry, the hint names the file.
    let (other_conf, other) = docker_config("elsewhere.invalid", "x", "y");
    let err = token_client(&reg, other).get_manifest(&image).unwrap_err();
    let hint = err.hint().unwrap();
    assert!(hint.contains(&other_conf.path().join("config.json").display().to_string()), "{hint}");
    assert!(hint.contains(&reg.host), "{hint}");
}

fn push_err(c: &RegistryClient, target: &kiln_reference::Reference) -> RegistryError {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, b"layer").unwrap();
    let d = kiln_oci::Descriptor::of_bytes("application/vnd.oci.image.layer.v1.tar", b"layer");
    c.push_blob(target, &d, &path).unwrap_err()
}

#[test]
fn short_lived_tokens_are_refreshed_on_401_and_access_token_is_read() {
    for field in [TokenField::AccessToken, TokenField::Both] {
        let issuer = TokenIssuer::start(IssuerOptions {
            expires_in: Some(2),
            field,
            ..IssuerOptions::default().user("ci", "pw", &["pull", "push"])
        });
        let reg = Registry::start_with_token_auth(&issuer);
        let image = r(&format!("{}/short/app:1", reg.host));
        let (_conf, creds) = docker_config(&reg.host, "ci", "pw");
        let c = token_client(&reg, creds);
        let (digest, _) = push_small(&c, &image, 1);
        assert_eq!(c.get_manifest(&image).unwrap().2, digest);
        let before = issuer.requests().len();
        // The cached tokens expire; the next requests get 401 and fetch new ones.
        std::thread::sleep(std::time::Duration::from_secs(4));
        assert_eq!(c.get_manifest(&image).unwrap().2, digest, "{field:?}");
        let after = issuer.requests().len();
        assert_eq!(after, before + 1, "one refresh: {:?}", issuer.requests());
    }
}

/// A config directory whose `auths` entry for `host` is an `identitytoken`.
fn identity_config(host: &str, token: &str) -> (tempfile::TempDir, Credentials) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, format!(r#"{{"auths":{{"{host}":{{"identitytoken":"{token}"}}}}}}"#))
        .unwrap();
    let creds = Credentials::from_file(&path).unwrap();
    (dir, creds)
}

#[test]
fn identity_tokens_are_exchanged_with_the_refresh_token_grant() {
    const REFRESH: &str = "kiln-refresh-7f3a9c";
    let issuer = TokenIssuer::start(IssuerOptions::default().refresh_token(
        REFRESH,
        "robot",
        &["pull", "push"],
    ));
    let reg = Registry::start_with_token_auth(&issuer);
    let image = r(&format!("{}/idt/app:1", reg.host));

    // Push and pull with nothing but the identity token.
    let (_conf, creds) = identity_config(&reg.host, REFRESH);
    let (digest, _) = push_small(&token_client(&reg, creds), &image, 2);
    let (_conf, creds) = identity_config(&reg.host, REFRESH);
    assert_eq!(pull_all(&token_client(&reg, creds), &image).digest, digest);
    let reqs = issuer.requests();
    assert_eq!(reqs.len(), 2, "one token for the push, one for the pull: {reqs:?}");
    for (req, scope) in reqs.iter().zip(["repository:idt/app:pull,push", "repository:idt/app:pull"])
    {
        // The OAuth2 form of the spec: POST, refresh_token grant, a client id, the service.
        assert_eq!(req.method, "POST", "{req:?}");
        assert_eq!(req.grant_type.as_deref(), Some("refresh_token"), "{req:?}");
        assert_eq!(req.client_id.as_deref(), Some("kiln"), "{req:?}");
        assert_eq!(req.service.as_deref(), Some(issuer.service.as_str()), "{req:?}");
        assert_eq!(req.scopes, vec![scope.to_owned()]);
        assert_eq!(req.user.as_deref(), Some("robot"));
        assert!(req.issued);
    }

    // A revoked (unknown) identity token: 401 naming the image, a hint naming the file and the
    // entry, and the token itself nowhere.
    const WRONG: &str = "kiln-revoked-41b2e8";
    let (wrong_conf, wrong) = identity_config(&reg.host, WRONG);
    let c = token_client(&reg, wrong);
    let err = c.get_manifest(&image).unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
    let hint = err.hint().unwrap();
    let text = format!("{err} {hint} {err:?} {c:?}");
    assert!(err.to_string().contains(&format!("{}/idt/app:1", reg.host)), "{err}");
    let file = wrong_conf.path().join("config.json").display().to_string();
    assert!(hint.contains(&file) && hint.contains(&format!("auths.{}", reg.host)), "{hint}");
    assert!(!text.contains(WRONG), "the identity token leaked: {text}");
    let last = issuer.requests().pop().unwrap();
    assert!(!last.issued && last.grant_type.as_deref() == Some("refresh_token"), "{last:?}");
    // Pushing with it fails the same way.
    let err = push_err(&c, &r(&format!("{}/idt/app:2", reg.host)));
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
    assert!(!format!("{err} {:?}", err.hint()).contains(WRONG));
}
