use super::*;

/// Checks the configuration; returns the requested lifetime in 4 s units.
pub(crate) fn validate(cfg: &ClientConfig) -> Result<u16> {
    if cfg.agents.is_empty() && cfg.discovery.is_none() {
        bail!("agents: at least one agent, or a discovery address, is needed");
    }
    if let Some(d) = cfg.discovery {
        if d.ip().is_unspecified() || d.ip().is_multicast() || d.port() == 0 {
            bail!("discovery: {d} is not a unicast address and port");
        }
    }
    for (i, a) in cfg.agents.iter().enumerate() {
        if a.ip().is_unspecified() || a.ip().is_multicast() {
            bail!("agents[{i}]: {a} is not a unicast address");
        }
        if a.port() == 0 {
            bail!("agents[{i}]: {a} has no port");
        }
        if cfg.agents[..i].contains(a) {
            bail!("agents[{i}]: {a} is given twice");
        }
    }
    if cfg.identity.is_empty() {
        bail!("identity: empty");
    }
    if cfg.identity.len() > wire::MAX_MN_ID_LEN {
        bail!(
            "identity: {} bytes; at most {} fit the MN-ID option",
            cfg.identity.len(),
            wire::MAX_MN_ID_LEN
        );
    }
    if cfg.identity.chars().any(char::is_control) {
        bail!("identity: {:?} contains control characters", cfg.identity);
    }
    if let Some(c) = &cfg.certificate {
        let cert = anycast_common::pki::Certificate::decode(&c.certificate)
            .map_err(|e| anyhow!("certificate: {e}"))?;
        if cert.body.identity != cfg.identity {
            bail!(
                "certificate: issued to '{}', not to this server's identity '{}'",
                cert.body.identity,
                cfg.identity
            );
        }
        if cert.subject_key() != c.key.verifying_key() {
            bail!("certificate: it names another key than the signing key given");
        }
        if cfg.discovery.is_some() {
            bail!(
                "discovery: agent discovery needs a key (its requests are authenticated with it)"
            );
        }
    } else if cfg.key.len() < MIN_KEY_BYTES {
        bail!(
            "key: {} bytes; at least {MIN_KEY_BYTES} are needed",
            cfg.key.len()
        );
    }
    if cfg.bindings.is_empty() {
        bail!("bindings: at least one anycast address is needed");
    }
    for (i, b) in cfg.bindings.iter().enumerate() {
        if b.anycast.is_unspecified() || b.anycast.is_multicast() {
            bail!("bindings[{i}]: {} is not a unicast address", b.anycast);
        }
        let sel = b.selector.as_ref().map(|s| (s.protocol, s.port));
        if let Some((proto, _)) = sel {
            if proto != PROTO_TCP && proto != PROTO_UDP {
                bail!("bindings[{i}]: protocol {proto}: only TCP (6) and UDP (17) are served");
            }
        }
        let same = |o: &AnycastBinding| {
            o.anycast == b.anycast && o.selector.as_ref().map(|s| (s.protocol, s.port)) == sel
        };
        if cfg.bindings[..i].iter().any(same) {
            bail!("bindings[{i}]: {} is given twice", b.anycast);
        }
    }
    if cfg.real_addresses.is_empty() {
        bail!("real_addresses: at least one real address is needed");
    }
    for (i, r) in cfg.real_addresses.iter().enumerate() {
        if r.is_unspecified() || r.is_multicast() {
            bail!("real_addresses[{i}]: {r} cannot receive tunnelled packets");
        }
        if cfg.real_addresses[..i].contains(r) {
            bail!("real_addresses[{i}]: {r} is given twice");
        }
    }
    if let LoadSource::Command(c) = &cfg.load {
        if c.trim().is_empty() {
            bail!("load: empty command");
        }
    }
    if cfg.initial_timeout.is_zero() {
        bail!("initial_timeout: must be more than zero");
    }
    if cfg.max_timeout < cfg.initial_timeout {
        bail!(
            "max_timeout: {:?} is less than initial_timeout {:?}",
            cfg.max_timeout,
            cfg.initial_timeout
        );
    }
    let unit_ms = u128::from(LIFETIME_UNIT_SECS) * 1000;
    let units = cfg.lifetime.as_millis().div_ceil(unit_ms).max(1);
    u16::try_from(units).map_err(|_| {
        anyhow!(
            "lifetime: {:?} is more than the {}s a binding update can ask for",
            cfg.lifetime,
            u64::from(u16::MAX) * LIFETIME_UNIT_SECS
        )
    })
}

#[cfg(test)]
mod tests {
    use anycast_common::pki::{CertPrefix, Certificate, CertificateBody, SigningKey};

    use super::super::tests::config;
    use super::*;

    fn certificate(identity: &str, key: &SigningKey) -> Vec<u8> {
        let host = |s: &str| CertPrefix::new(s.parse().unwrap(), 32).unwrap();
        let body = CertificateBody {
            serial: 1,
            not_before: 0,
            not_after: u64::MAX / 2,
            subject_key: key.verifying_key().to_bytes(),
            identity: identity.into(),
            real: vec![host("10.0.2.11")],
            anycast: vec![host("192.0.2.1")],
        };
        Certificate::issue(body, &SigningKey::from_bytes(&[9; 32]))
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn registering_with_a_certificate_needs_no_key_but_a_matching_identity_and_key() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let with = |identity: &str, signing: &SigningKey| ClientConfig {
            key: Vec::new(),
            certificate: Some(RegistrationCertificate {
                certificate: certificate(identity, &key),
                key: signing.clone(),
            }),
            ..config("10.0.0.1:4191".parse().unwrap(), "10.0.2.11", "192.0.2.1")
        };
        assert!(validate(&with("s1", &key)).is_ok(), "no key needed");
        let e = validate(&with("s2", &key)).unwrap_err().to_string();
        assert!(e.contains("issued to 's2'"), "{e}");
        let e = validate(&with("s1", &SigningKey::from_bytes(&[6; 32])))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another key"), "{e}");
        let discovering = ClientConfig {
            discovery: Some("10.0.0.9:4191".parse().unwrap()),
            ..with("s1", &key)
        };
        let e = validate(&discovering).unwrap_err().to_string();
        assert!(e.contains("needs a key"), "{e}");
        let keyless = ClientConfig {
            key: Vec::new(),
            ..config("10.0.0.1:4191".parse().unwrap(), "10.0.2.11", "192.0.2.1")
        };
        assert!(
            validate(&keyless).is_err(),
            "without a certificate a key is needed"
        );
    }
}
