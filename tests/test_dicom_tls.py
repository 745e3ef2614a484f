"""DICOM TLS for the node (issue 32, item 2) against a real TLS peer: Orthanc 1.10 with DICOM TLS on.

The test makes its certificates (a CA, the node's, Orthanc's, a workstation's, and a stranger's from another CA).
Orthanc C-STOREs a study to the node over mutual TLS and gets the node's result back over TLS; a caller in plain
TCP, one without a certificate and one whose certificate another CA signed get no association (the failed
handshakes are logged with the caller's address); a destination whose certificate the node's CA did not sign gets no
SEG. The node runs with an injected processor (its "SEG" is a copy of the first instance), so no model is needed.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl

import pynetdicom
import pytest
from orthanc import Orthanc, find_orthanc, wait_until
from test_dicom_node import NODE_AET, fake_process, small_series

from medssl.clinic.dicom_node import DicomNode
from medssl.clinic.dicom_send import SendError, send_file
from medssl.clinic.dicom_tls import Tls
from medssl.data import DataError

ECHO = "1.2.840.10008.1.1"


def make_certificates(folder):
    """PEM files: ca, node, orthanc, workstation (signed by ca), stranger (signed by another CA); {name: (cert, key)}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    folder.mkdir(parents=True, exist_ok=True)

    def key():
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def write(name, cert, private):
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ))  # fmt: skip
        return str(folder / f"{name}.pem"), str(folder / f"{name}.key")

    def ca(name):
        private = key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(private.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(private, hashes.SHA256())
        )  # fmt: skip
        return cert, private

    def leaf(name, issuer, issuer_key):
        private = key()
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer.subject).public_key(private.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256())
        )  # fmt: skip
        return cert, private

    ca_cert, ca_key = ca("medssl test CA")
    other_cert, other_key = ca("another CA")
    files = {"ca": write("ca", ca_cert, ca_key)}
    for name in ("node", "orthanc", "workstation"):
        files[name] = write(name, *leaf(name.upper(), ca_cert, ca_key))
    files["stranger"] = write("stranger", *leaf("STRANGER", other_cert, other_key))
    files["other_ca"] = write("other_ca", other_cert, other_key)
    return files


@pytest.fixture(scope="module")
def certs(module_tmp):
    return make_certificates(module_tmp("certs"))


def client(ca=None, cert=None):
    """A TLS client context: trusting ``ca`` (None: no check of the node), presenting ``cert`` (cert, key)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    if ca:
        context.load_verify_locations(ca)
    else:
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(*cert)
    return context


def echo(port, tls_context=None):
    ae = pynetdicom.AE(ae_title="WORKSTATION")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ECHO)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET,
                         tls_args=(tls_context, "127.0.0.1") if tls_context else None)  # fmt: skip
    if not assoc.is_established:
        return "no association"
    try:
        return "echo ok" if getattr(assoc.send_c_echo(), "Status", None) == 0 else "echo failed"
    finally:
        assoc.release()


def test_the_node_speaks_mutual_tls_with_orthanc_and_refuses_the_rest(certs, module_tmp, tmp_path, caplog):
    if not find_orthanc():
        pytest.skip("Orthanc not installed (apt-get install orthanc orthanc-dicomweb); CI installs it")
    caplog.set_level("INFO", logger="medssl.clinic.dicom_node")
    orthanc_tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": certs["orthanc"][0],
        "DicomTlsPrivateKey": certs["orthanc"][1],
        "DicomTlsTrustedCertificates": certs["ca"][0],
        "DicomTlsRemoteCertificateRequired": True,
    }
    with Orthanc(module_tmp("orthanc_tls"), extra=orthanc_tls) as pacs:
        node = DicomNode(
            tmp_path / "work", port=0, destination=(pacs.aet, "127.0.0.1", pacs.dicom_port), quiet_seconds=30,
            process=fake_process(), tls_cert=certs["node"][0], tls_key=certs["node"][1], tls_ca=certs["ca"][0],
            allow="*@127.0.0.1",
        ).start()  # fmt: skip
        try:
            pacs.add_modality("node", NODE_AET, node.port, tls=True)
            files = small_series(tmp_path / "s", study_uid="1.2.3.77")
            study = [pacs.upload(f) for f in files][0]["ParentStudy"]
            before = pacs.instance_count()
            job = pacs.store_to("node", study)
            wait_until(lambda: pacs.instance_count() == before + 1, 60, "the node's result stored in Orthanc over TLS",
                       log=lambda: f"{pacs.get('/jobs/' + job['ID'])}\n{caplog.text[-3000:]}\n{pacs.log_tail()}")
            assert pacs.get(f"/jobs/{job['ID']}")["State"] == "Success"
            assert "SEG of series" in caplog.text and "sent to ORTHANC" in caplog.text

            # callers: only a certificate of the node's CA gets in
            assert echo(node.port, client(certs["ca"][0], certs["workstation"])) == "echo ok"
            assert echo(node.port) == "no association"  # plain TCP
            assert echo(node.port, client(certs["ca"][0])) == "no association"  # TLS, no certificate
            assert echo(node.port, client(None, certs["stranger"])) == "no association"  # another CA's certificate
            assert caplog.text.count("refused a TLS connection from 127.0.0.1") >= 3
        finally:
            node.stop()
    # a destination whose certificate another CA signed gets nothing from the node
    tls = Tls.from_options(*certs["node"], certs["ca"][0])
    impostor = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    impostor.load_cert_chain(*certs["stranger"])
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title="COLLECT")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=impostor)
    try:
        with pytest.raises(SendError, match="TLS handshake failed"):
            send_file(files[0], ("COLLECT", "127.0.0.1", server.server_address[1]), retries=1, tls=tls)
    finally:
        server.shutdown()


def test_bad_tls_options_are_refused_naming_them(certs, tmp_path):
    with pytest.raises(DataError, match="--tls_cert and --tls_key: give both"):
        DicomNode(tmp_path / "w", tls_cert=certs["node"][0])
    with pytest.raises(DataError, match="--tls_ca needs them"):
        DicomNode(tmp_path / "w", tls_ca=certs["ca"][0])
    with pytest.raises(DataError, match=r"--tls_key '.*nokey.pem': file not found"):
        DicomNode(tmp_path / "w", tls_cert=certs["node"][0], tls_key=str(tmp_path / "nokey.pem"))
    with pytest.raises(DataError, match="not a PEM certificate and its matching private key"):
        DicomNode(tmp_path / "w", tls_cert=certs["node"][0], tls_key=certs["orthanc"][1])  # another key
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    with pytest.raises(DataError, match="--tls_ca .*garbage.pem: not PEM CA certificates"):
        DicomNode(tmp_path / "w", tls_cert=certs["node"][0], tls_key=certs["node"][1], tls_ca=tmp_path / "garbage.pem")
