//! Throwaway TLS material for the tests (a CA, a server and a client certificate), made with the
//! openssl command line tool. Standard library only, so tests of other crates can include it
//! with `#[path]`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Throwaway TLS material made with the openssl command line tool in `dir`: a CA, a server
/// certificate it issued for `server_san` (an openssl subjectAltName value, e.g.
/// `DNS:localhost` or `DNS:localhost,IP:127.0.0.1`) and a client certificate. PEM files.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub fn test_pki(dir: &Path, server_san: &str) -> TestPki {
    std::fs::write(
        dir.join("ca.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = ca\n\
         [dn]\nCN = fracture test CA (throwaway)\n\
         [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n",
    )
    .expect("write ca.cnf");
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = {server_san}\n\
             subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        ),
    )
    .expect("write server.ext");
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
         extendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid\n",
    )
    .expect("write client.ext");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run openssl ({e}): the TLS tests make their throwaway CA with the openssl \
                     command line tool; install it (Debian package openssl, which ca-certificates \
                     depends on)"
                )
            });
        assert!(
            out.status.success(),
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509", "-config", "ca.cnf"][..],
            &ec,
            &["-days", "2", "-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    for (name, cn, serial) in [
        ("server", "localhost", "0x5eed0001"),
        ("client", "fracture test sender", "0x5eed0002"),
    ] {
        let subj = format!("/CN={cn}");
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        openssl(
            &[
                &["req", "-new", "-config", "ca.cnf", "-subj", &subj][..],
                &ec,
                &["-keyout", &key, "-out", &csr],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            serial,
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }
    TestPki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}
