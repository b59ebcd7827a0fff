//! `registration.certificates`: servers that hold a certificate from the operator
//! (`anycast-ctl pki issue`) may register without a key of their own; which services accept
//! them is the agent's policy.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{err, Config, ConfigError};

/// Certificate-signed registration (see the README, "Registration with certificates").
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateRegistration {
    /// The operator's public key files (`anycast-ctl pki keygen`): a certificate must be
    /// signed by one of them. Relative paths are relative to the config file.
    pub trust: Vec<PathBuf>,
    /// The operator's revocation list (`anycast-ctl pki revoke`), read at start and on each
    /// reload. Absent: nothing revoked.
    #[serde(default)]
    pub revocations: Option<PathBuf>,
    /// Names of the configured services (`services[].name`) that take certificate-signed
    /// registrations; a binding for an address or service not among them is refused.
    pub services: Vec<String>,
    /// Certificate-signed updates whose signatures are checked per second, over all senders
    /// (a burst of twice that); the rest are dropped unchecked and counted. Each check costs
    /// two Ed25519 verifications.
    #[serde(default = "default_checks_per_second")]
    pub checks_per_second: u32,
    /// Whether an identity listed in `registration.servers` (one with a key) may also
    /// register with a certificate; its configured `allow` and `real` then apply on top of
    /// the certificate's. Default false: a certificate cannot take over a keyed identity.
    #[serde(default)]
    pub keyed_identities: bool,
}

pub fn default_checks_per_second() -> u32 {
    200
}

impl Config {
    pub(super) fn validate_certificates(
        &self,
        c: &CertificateRegistration,
    ) -> Result<(), ConfigError> {
        let f = |field: &str| format!("registration.certificates.{field}");
        if c.trust.is_empty() {
            return Err(err(f("trust"), "lists no operator key"));
        }
        if c.services.is_empty() {
            return Err(err(f("services"), "lists no service"));
        }
        for (i, name) in c.services.iter().enumerate() {
            if !self.services.iter().any(|s| &s.name == name) {
                return Err(err(
                    format!("registration.certificates.services[{i}]"),
                    format!("'{name}' is not a configured service"),
                ));
            }
        }
        if c.checks_per_second == 0 {
            return Err(err(f("checks_per_second"), "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(certificates: &str) -> String {
        format!(
            r#"{{
              "interfaces": ["eth0"],
              "agent_address": {{"v4": "10.0.0.1"}},
              "services": [
                {{"name": "web", "address": "192.0.2.10", "protocol": "tcp", "port": 80,
                  "servers": []}}
              ],
              "registration": {{"servers": [], "certificates": {certificates}}}
            }}"#
        )
    }

    #[test]
    fn certificate_registration_parses_with_defaults_and_names_its_services() {
        let c = Config::parse(&config(r#"{"trust": ["op.pub"], "services": ["web"]}"#)).unwrap();
        let cr = c.registration.unwrap().certificates.unwrap();
        assert_eq!(cr.checks_per_second, 200);
        assert!(!cr.keyed_identities);
        assert_eq!(cr.revocations, None);
        for (text, field) in [
            (
                r#"{"trust": [], "services": ["web"]}"#,
                "registration.certificates.trust",
            ),
            (
                r#"{"trust": ["op.pub"], "services": []}"#,
                "registration.certificates.services",
            ),
            (
                r#"{"trust": ["op.pub"], "services": ["mail"]}"#,
                "registration.certificates.services[0]",
            ),
            (
                r#"{"trust": ["op.pub"], "services": ["web"], "checks_per_second": 0}"#,
                "registration.certificates.checks_per_second",
            ),
        ] {
            assert_eq!(Config::parse(&config(text)).unwrap_err().field, field);
        }
        assert!(
            Config::parse(&config(r#"{"trust": ["a"], "services": ["web"], "x": 1}"#)).is_err()
        );
    }
}
