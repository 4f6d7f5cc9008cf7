"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler as local processes, for the cluster test tier.

Usage::

    with ControlPlane() as cp:              # binaries from deploy/build-binaries.sh (dev.sh setup)
        cp.kubectl("get", "nodes", check=True)
        print(cp.kubeconfig, cp.server)

Everything (certificates, etcd data, component logs, the admin kubeconfig) lives in one temp
directory, removed on ``stop()`` unless ``keep=True`` (or ``FEDFLEET_KEEP_CLUSTER=1``). Every
component binds to 127.0.0.1 only, on free ports; the kube-controller-manager and
kube-scheduler serve no port at all (``--secure-port=0``). Each child runs under
``setpriv --pdeathsig KILL`` so a killed test run leaves no orphans.

``ControlPlane(advertise_address="192.0.2.2")`` is for a real node (tests/cluster/realnode.py):
the apiserver then binds to and advertises that (non-loopback) address, which is also in its
serving certificate and in ``server``, and keeps the default endpoint reconciler, so the
in-cluster ``kubernetes`` Service has an endpoint pods can reach (Kubernetes refuses loopback
endpoints). The default (None) is unchanged: everything on 127.0.0.1.

Certificates: one CA (signs the serving cert, the admin client cert, and is the controller
manager's cluster-signing CA), an ECDSA service-account key pair, a serving cert for 127.0.0.1 /
localhost / kubernetes.default.svc / 10.0.0.1, and an admin client cert with O=system:masters.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.binaries import BinariesMissing, read_binaries_env

__all__ = [
    "Binaries",
    "ControlPlane",
    "ControlPlaneError",
    "free_port",
    "load_binaries",
]

SERVICE_CIDR = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"


class ControlPlaneError(RuntimeError):
    """A component failed to start, or the binaries are missing."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: str
    kube_controller_manager: str
    kube_scheduler: str
    kubectl: str
    etcd: str
    helm: str
    k8s_version: str

    @classmethod
    def from_values(cls, values: dict[str, str]) -> Binaries:
        """From the ``FEDFLEET_*`` variables of build-binaries.sh's env.sh."""
        try:
            return cls(
                kube_apiserver=values["FEDFLEET_KUBE_APISERVER"],
                kube_controller_manager=values["FEDFLEET_KUBE_CONTROLLER_MANAGER"],
                kube_scheduler=values["FEDFLEET_KUBE_SCHEDULER"],
                kubectl=values["FEDFLEET_KUBECTL"],
                etcd=values["FEDFLEET_ETCD"],
                helm=values["FEDFLEET_HELM"],
                k8s_version=values["FEDFLEET_K8S_VERSION"],
            )
        except KeyError as exc:
            raise ControlPlaneError(f"the binaries' env.sh lacks {exc}") from None


def load_binaries() -> Binaries:
    """The binaries built by the setup step (deploy/build-binaries.sh); never builds.

    Raises ControlPlaneError saying how to build them if they are missing.
    """
    try:
        values = read_binaries_env()
    except BinariesMissing as exc:
        raise ControlPlaneError(str(exc)) from None
    return Binaries.from_values(values)


# -- certificates ---------------------------------------------------------------------------------


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    name = _name("fedfleet-test-ca")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    *,
    server: bool,
    dns: list[str] | None = None,
    ips: list[str] | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


# -- the control plane ----------------------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler on 127.0.0.1.

    Attributes after ``start()``: ``server`` (https URL), ``kubeconfig`` (admin, system:masters),
    ``ca_file``, ``issuer`` (service-account issuer = the apiserver URL), ``workdir``,
    ``startup_seconds`` (dict of phase timings).
    """

    COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")

    def __init__(
        self,
        binaries: Binaries | None = None,
        *,
        workdir: Path | None = None,
        keep: bool | None = None,
        startup_timeout: float = 120.0,
        verbosity: int = 1,
        advertise_address: str | None = None,
    ) -> None:
        self.binaries = binaries if binaries is not None else load_binaries()
        self._own_dir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="fedfleet-cluster-")) if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keep = keep if keep is not None else os.environ.get("FEDFLEET_KEEP_CLUSTER") == "1"
        self.startup_timeout = startup_timeout
        self.verbosity = verbosity
        if advertise_address is not None and ipaddress.ip_address(advertise_address).is_loopback:
            raise ControlPlaneError(f"advertise_address {advertise_address} is a loopback address")
        self.advertise_address = advertise_address
        self.pki = self.workdir / "pki"
        self.logs = self.workdir / "logs"
        self.etcd_port = 0
        self.apiserver_port = 0
        self.server = ""
        self.issuer = ""
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.ca_file = self.pki / "ca.crt"
        self.startup_seconds: dict[str, float] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._admin_ssl: ssl.SSLContext | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        t0 = time.monotonic()
        try:
            self._write_pki()
            self.startup_seconds["certs"] = time.monotonic() - t0
            self._start_etcd()
            self._start_apiserver()
            self._wait_apiserver_ready()
            self.startup_seconds["apiserver_ready"] = time.monotonic() - t0
            self._start_controller_manager()
            self._start_scheduler()
            self._wait_controllers()
            self.startup_seconds["total"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the components in reverse order (SIGTERM, then SIGKILL after 10 s)."""
        for name in reversed(self.COMPONENTS):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        if self._own_dir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs.values())

    def check_alive(self) -> None:
        """Raise ControlPlaneError naming any component that has exited."""
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}"
                )

    # -- helpers ----------------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_path(name)
        if not path.exists():
            return f"(no log for {name})"
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            text = fh.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def kubectl(
        self,
        *args: str,
        check: bool = False,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl with the admin kubeconfig; output is captured as text."""
        proc = subprocess.run(
            [self.binaries.kubectl, f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def api_get(self, path: str, timeout: float = 10.0) -> object:
        """GET a path of the apiserver as admin and return the decoded JSON."""
        req = urllib.request.Request(self.server + path)
        with urllib.request.urlopen(req, context=self._ssl(), timeout=timeout) as resp:
            return json.loads(resp.read())

    # -- internals --------------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext:
        if self._admin_ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
            self._admin_ssl = ctx
        return self._admin_ssl

    def _write_pki(self) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        ca_key, ca_cert = _make_ca()
        serving_key, serving_cert = _issue(
            ca_key,
            ca_cert,
            _name("kube-apiserver"),
            server=True,
            dns=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ips=["127.0.0.1", KUBERNETES_SERVICE_IP]
            + ([self.advertise_address] if self.advertise_address else []),
        )
        admin_key, admin_cert = _issue(
            ca_key, ca_cert, _name("fedfleet-admin", "system:masters"), server=False
        )
        sa_key = _key()
        files = {
            "ca.crt": _cert_pem(ca_cert),
            "ca.key": _key_pem(ca_key),
            "apiserver.crt": _cert_pem(serving_cert),
            "apiserver.key": _key_pem(serving_key),
            "admin.crt": _cert_pem(admin_cert),
            "admin.key": _key_pem(admin_key),
            "sa.key": _key_pem(sa_key),
            "sa.pub": sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        }
        for fname, data in files.items():
            path = self.pki / fname
            path.write_bytes(data)
            path.chmod(0o600 if fname.endswith(".key") else 0o644)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.log_path(name).open("ab")
        try:
            proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            log.close()
        self._procs[name] = proc
        return proc

    def _start_etcd(self) -> None:
        self.etcd_port = free_port()
        peer_port = free_port()
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                self.binaries.etcd,
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
                "--quota-backend-bytes=2147483648",
            ],
        )

    def _start_apiserver(self) -> None:
        self.apiserver_port = free_port()
        address = self.advertise_address or "127.0.0.1"
        self.server = f"https://{address}:{self.apiserver_port}"
        self.issuer = self.server
        pki = self.pki
        if self.advertise_address is None:
            # The `kubernetes` Service keeps its ClusterIP but gets no Endpoints: Kubernetes
            # refuses loopback endpoint addresses. A control plane alone needs none; a node's
            # pods do (advertise_address).
            endpoints = ["--endpoint-reconciler-type=none"]
        else:
            endpoints = []  # the default (lease) reconciler publishes advertise_address
        self._spawn(
            "kube-apiserver",
            [
                self.binaries.kube_apiserver,
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--bind-address={address}",
                f"--advertise-address={address}",
                f"--secure-port={self.apiserver_port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={self.issuer}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                *endpoints,
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                f"--kubelet-client-certificate={pki / 'admin.crt'}",
                f"--kubelet-client-key={pki / 'admin.key'}",
                "--profiling=false",
                "--enable-priority-and-fairness=false",
                "--event-ttl=1h",
                f"--v={self.verbosity}",
            ],
        )

    def _start_controller_manager(self) -> None:
        pki = self.pki
        self._spawn(
            "kube-controller-manager",
            [
                self.binaries.kube_controller_manager,
                f"--kubeconfig={self.kubeconfig}",
                "--controllers=*",
                "--leader-elect=false",
                "--secure-port=0",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Client-side throttling (default 20 QPS) dominates start-up otherwise.
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
                "--profiling=false",
                f"--v={self.verbosity}",
            ],
        )

    def _start_scheduler(self) -> None:
        self._spawn(
            "kube-scheduler",
            [
                self.binaries.kube_scheduler,
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
                "--profiling=false",
                f"--v={self.verbosity}",
            ],
        )

    def _write_kubeconfig(self) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fedfleet",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(self.pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(self.pki / "admin.crt"),
                        "client-key": str(self.pki / "admin.key"),
                    },
                }
            ],
            "contexts": [{"name": "fedfleet", "context": {"cluster": "fedfleet", "user": "admin"}}],
            "current-context": "fedfleet",
        }
        # JSON is valid YAML; kubectl, helm and the python client all read it.
        self.kubeconfig.write_text(json.dumps(cfg, indent=2))
        self.kubeconfig.chmod(0o600)

    def _wait_apiserver_ready(self) -> None:
        self._write_kubeconfig()
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                req = urllib.request.Request(self.server + "/readyz")
                with urllib.request.urlopen(req, context=self._ssl(), timeout=2) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except (OSError, ssl.SSLError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise ControlPlaneError(
            f"kube-apiserver not ready after {self.startup_timeout} s ({last}):\n"
            f"{self.log_tail('kube-apiserver')}"
        )

    def _wait_controllers(self) -> None:
        """Wait until the controller manager works: the `default` ServiceAccount exists (pods
        cannot be admitted without it) and kube-root-ca.crt is published in `default`."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                self.api_get("/api/v1/namespaces/default/serviceaccounts/default")
                self.api_get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt")
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
            except OSError:
                pass
            time.sleep(0.1)
        raise ControlPlaneError(
            "kube-controller-manager did not create default/default ServiceAccount in "
            f"{self.startup_timeout} s:\n{self.log_tail('kube-controller-manager')}"
        )
