"""Secured clusters: attach to a Dask scheduler that requires TLS, with the certificate paths in the
executor's YAML config. The test makes its own CA and certificates (``cryptography``), starts
``dask scheduler --protocol tls`` and a ``dask worker`` with them, and stops both by PID."""

from __future__ import annotations

import datetime
import ipaddress
import time
from pathlib import Path

import pytest
from clusters_multinode import DaskNodes, wait_for_workers

from flowdapt_nb import Stage, Workflow
from flowdapt_nb.config import executor_from_config
from flowdapt_nb.errors import ConfigError

pytestmark = pytest.mark.timeout(240)  # a hang fails one test, not the suite


# --- certificates --------------------------------------------------------------------------------


def make_ca_and_cert(folder: Path, name: str) -> dict[str, str]:
    """A self-signed CA plus one certificate it signed (for 127.0.0.1 / localhost, usable as server
    and client), written as PEM files; returns their paths as {'ca', 'cert', 'key'}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = dict(
        not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=1)
    )

    def build(subject, issuer, public_key):
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
        )
        return b.not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (
        build(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} node")]), ca_name, key.public_key())
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": folder / f"{name}-ca.pem",
        "cert": folder / f"{name}-cert.pem",
        "key": folder / f"{name}-key.pem",
    }
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    paths["key"].chmod(0o600)
    return {k: str(v) for k, v in paths.items()}


# --- a TLS-only Dask cluster ---------------------------------------------------------------------


class TlsDaskCluster(DaskNodes):
    """``dask scheduler --protocol tls`` plus one ``dask worker``, both with the 'good' certificates;
    'other' certificates come from a second CA the scheduler doesn't trust."""

    prefix = "fnbtls"

    def __init__(self):
        super().__init__({"worker": ""}, memory_limit="500MB", protocol="tls")
        self.good = make_ca_and_cert(self.dir, "good")
        self.other = make_ca_and_cert(self.dir, "other")
        tls = [
            "--tls-ca-file",
            self.good["ca"],
            "--tls-cert",
            self.good["cert"],
            "--tls-key",
            self.good["key"],
        ]
        self.scheduler_args = self.extra = tls

    def yaml(self, certs: dict[str, str], timeout: float = 30) -> str:
        return (
            f"target: dask\ncluster_address: {self.address}\nconnect_timeout: {timeout}\n"
            f"tls_ca_file: {certs['ca']}\ntls_client_cert: {certs['cert']}\ntls_client_key: {certs['key']}\n"
        )


@pytest.fixture(scope="module")
def tls_cluster():
    cluster = TlsDaskCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()
    assert all(p.poll() is not None for p in cluster.procs.values())


# --- tests ---------------------------------------------------------------------------------------


def test_dask_run_on_a_tls_scheduler_with_certificates_from_the_yaml(tls_cluster):
    ex = executor_from_config(tls_cluster.yaml(tls_cluster.good))
    ex.start()
    try:
        wait_for_workers(ex, 1, logs=tls_cluster.logs)
        assert ex.info()["workers"][0]["name"].startswith("tls://127.0.0.1:"), ex.info()
        wf = Workflow(
            "tls",
            stages=[
                Stage("square", lambda x: x * x, type="parameterized", options={"map_on": "xs"}),
                Stage("total", lambda squares: sum(squares), depends_on=["square"]),
            ],
        )
        run = ex.run(wf, input={"xs": [1, 2, 3]})
        assert run.result == 14, run
        assert set(run.tasks["worker"]) == {ex.info()["workers"][0]["name"]}, run.tasks
    finally:
        ex.close()


def test_dask_certificate_from_another_ca_is_one_clear_error_not_a_hang(tls_cluster):
    ex = executor_from_config(tls_cluster.yaml(tls_cluster.other, timeout=10))
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        ex.start()
    elapsed = time.monotonic() - t0
    text = str(err.value)
    assert tls_cluster.address in text and "TLS" in text and "tls_client_cert" in text, text
    # no timed assertion on speed: only that it ended inside connect_timeout plus start-up slack
    assert elapsed < 10 + 30, elapsed
    assert not ex.running


def test_dask_tls_address_without_certificates_names_the_missing_key(tls_cluster):
    ex = executor_from_config(f"target: dask\ncluster_address: {tls_cluster.address}\nconnect_timeout: 10\n")
    with pytest.raises(ConfigError) as err:
        ex.start()
    assert err.value.key == "tls_ca_file" and tls_cluster.address in str(err.value), err.value


def test_dask_missing_certificate_file_is_a_config_error_naming_the_key(tmp_path):
    yaml = (
        "target: dask\ncluster_address: tls://127.0.0.1:8786\n"
        f"tls_ca_file: {tmp_path / 'ca.pem'}\ntls_client_cert: {tmp_path / 'nope.pem'}\n"
    )
    (tmp_path / "ca.pem").write_text("not checked before connecting\n")
    with pytest.raises(ConfigError) as err:
        executor_from_config(yaml)
    assert err.value.key == "tls_client_cert" and err.value.line == 4, err.value
    assert "no such file" in str(err.value) and "nope.pem" in str(err.value), err.value


def test_dask_unknown_tls_key_names_the_nearest_valid_one():
    with pytest.raises(ConfigError) as err:
        executor_from_config("target: dask\ncluster_address: tls://127.0.0.1:8786\ntls_client_crt: x.pem\n")
    assert err.value.key == "tls_client_crt" and "tls_client_cert" in str(err.value), err.value


def test_dask_tls_fields_without_a_tls_address_are_an_error_not_ignored(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("x\n")
    for extra in ("", "cluster_address: tcp://127.0.0.1:1\n"):
        ex = executor_from_config(f"target: dask\n{extra}tls_ca_file: {pem}\n")
        with pytest.raises(ConfigError) as err:
            ex.start()
        assert err.value.key == "tls_ca_file", err.value
        assert not ex.running
