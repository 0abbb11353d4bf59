"""Test certificates in Cloud Hypervisor's tls_dir layout, made with the openssl command line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from chmig.transport import (
    CA_CERT_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
)


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True
    )


def _make_ca(work: Path, name: str) -> tuple[Path, Path]:
    """A self-signed EC P-256 CA valid for 2 days; returns (cert, key)."""
    cert, key = work / f"{name}-ca-cert.pem", work / f"{name}-ca-key.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", key, "-out", cert, "-days", "2",
        "-subj", f"/CN=chmig test CA {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=work,
    )
    return cert, key


def _make_leaf(
    work: Path, ca: tuple[Path, Path], name: str, extensions: str
) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca``; returns (cert, key)."""
    ca_cert, ca_key = ca
    cert, key, csr = work / f"{name}-cert.pem", work / f"{name}-key.pem", work / f"{name}.csr"
    ext = work / f"{name}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n" + extensions
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN=chmig test {name}",
        cwd=work,
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
        "-set_serial", str(int.from_bytes(os.urandom(8), "big")),
        "-days", "2", "-extfile", ext, "-out", cert,
        cwd=work,
    )
    return cert, key


def _tls_dir(path: Path, files: dict[str, Path]) -> Path:
    path.mkdir()
    for name, source in files.items():
        shutil.copy(source, path / name)
    return path


class Pki:
    """Certificate directories in Cloud Hypervisor's layout."""

    def __init__(self, root: Path) -> None:
        work = root / "work"
        work.mkdir()
        ca = _make_ca(work, "good")
        server = _make_leaf(
            work, ca, "server",
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n",
        )
        client = _make_leaf(work, ca, "client", "extendedKeyUsage=clientAuth\n")
        rogue_ca = _make_ca(work, "rogue")
        rogue_client = _make_leaf(work, rogue_ca, "rogue-client", "extendedKeyUsage=clientAuth\n")

        # Both roles in one directory, as on a host that sends and receives.
        self.good = _tls_dir(root / "good", {
            CA_CERT_FILE: ca[0],
            SERVER_CERT_FILE: server[0], SERVER_KEY_FILE: server[1],
            CLIENT_CERT_FILE: client[0], CLIENT_KEY_FILE: client[1],
        })
        # Trusts the right CA but presents a certificate from another CA:
        # the receiver must refuse it.
        self.rogue_client = _tls_dir(root / "rogue-client", {
            CA_CERT_FILE: ca[0],
            CLIENT_CERT_FILE: rogue_client[0], CLIENT_KEY_FILE: rogue_client[1],
        })
        rogue_server = _make_leaf(
            work, rogue_ca, "rogue-server",
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n",
        )
        # A host of another organisation: its own CA, its own certificates.
        self.stranger = _tls_dir(root / "stranger", {
            CA_CERT_FILE: rogue_ca[0],
            SERVER_CERT_FILE: rogue_server[0], SERVER_KEY_FILE: rogue_server[1],
            CLIENT_CERT_FILE: rogue_client[0], CLIENT_KEY_FILE: rogue_client[1],
        })
        # A sender that trusts only the rogue CA: it must refuse the receiver.
        self.distrusting_client = _tls_dir(root / "distrusting-client", {
            CA_CERT_FILE: rogue_ca[0],
            CLIENT_CERT_FILE: client[0], CLIENT_KEY_FILE: client[1],
        })
