//! Connections to Postgres with the TLS behaviour libpq users expect from `sslmode`: the regular
//! `tokio-postgres` connection (catalog, checkpoints) and the replication session's settings.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{ConnParams, SslMode};

/// Session settings that make the text form of values predictable (see `source::value`).
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 -c extra_float_digits=3 -c bytea_output=hex";

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read sslrootcert {path}: {source}")]
    RootCert {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sslrootcert {0} holds no usable certificate")]
    NoRootCert(String),
    #[error("cannot connect to postgres at {target}: {source}")]
    Postgres {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ConnectError {
    /// The SQLSTATE of a server-side refusal, if any.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            ConnectError::Postgres { source, .. } => source.code(),
            _ => None,
        }
    }
}

/// Open a regular connection; the connection task is spawned and ends with the client.
pub async fn connect(
    params: &ConnParams,
    application_name: &str,
) -> Result<tokio_postgres::Client, ConnectError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&params.host)
        .port(params.port)
        .user(&params.user)
        .dbname(&params.dbname)
        .application_name(application_name)
        .options(SESSION_OPTIONS)
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = &params.password {
        cfg.password(secrecy::ExposeSecret::expose_secret(p));
    }
    let target = params.display();
    let wrap = |source| ConnectError::Postgres {
        target: target.clone(),
        source,
    };
    let client = if params.sslmode == SslMode::Disable {
        cfg.ssl_mode(PgSslMode::Disable);
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(wrap)?;
        tokio::spawn(conn);
        client
    } else {
        cfg.ssl_mode(match params.sslmode {
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        let tls = MakeRustlsConnect::new(client_config(params)?);
        let (client, conn) = cfg.connect(tls).await.map_err(wrap)?;
        tokio::spawn(conn);
        client
    };
    Ok(client)
}

/// The replication session's TLS settings for the same `sslmode`.
pub fn replication_tls(params: &ConnParams) -> pgwire_replication::TlsConfig {
    use pgwire_replication::TlsConfig;
    let ca = params.sslrootcert.clone();
    match params.sslmode {
        SslMode::Disable => TlsConfig::disabled(),
        SslMode::Prefer => TlsConfig {
            mode: pgwire_replication::SslMode::Prefer,
            ..TlsConfig::disabled()
        },
        SslMode::Require => TlsConfig::require(),
        SslMode::VerifyCa => TlsConfig::verify_ca(ca),
        SslMode::VerifyFull => TlsConfig::verify_full(ca),
    }
}

fn client_config(params: &ConnParams) -> Result<rustls::ClientConfig, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(root_store(params)?);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"));
    let config = match params.sslmode {
        SslMode::VerifyFull => builder.with_root_certificates(roots).with_no_client_auth(),
        mode => {
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            )
            .build()
            .ok();
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(LibpqVerifier {
                    verify_chain: mode == SslMode::VerifyCa,
                    webpki,
                    provider,
                }))
                .with_no_client_auth()
        }
    };
    Ok(config)
}

fn root_store(params: &ConnParams) -> Result<RootCertStore, ConnectError> {
    let mut roots = RootCertStore::empty();
    match &params.sslrootcert {
        Some(path) => {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| ConnectError::RootCert {
                path: shown.clone(),
                source,
            })?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(ConnectError::NoRootCert(shown));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(roots)
}

/// `require` / `prefer` (no verification) and `verify-ca` (chain, not host name), as libpq does.
#[derive(Debug)]
struct LibpqVerifier {
    verify_chain: bool,
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.verify_chain {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(webpki) = &self.webpki else {
            return Err(rustls::Error::General(
                "no trusted root certificates".into(),
            ));
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
