"""deploy/: the Dockerfile and the Kubernetes manifests agree with the daemon and with each other.

There is no Docker engine or cluster here, so this checks what an operator would otherwise
find out at 3 a.m.: a probe on the wrong port or service name, a grace period shorter than the
drain, a config mount at a path `--config` does not read, a ConfigMap config that does not
validate. Then it runs what can run locally: the wheel the Dockerfile builds, from exactly the
files the Dockerfile copies past .dockerignore, and `model-broker serve` with the container's
args and the ConfigMap's config, probed like the kubelet would and stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import zipfile
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from broker.auth import hash_key, open_listen_warning
from broker.cli import build_parser
from broker.config import ConfigError, Settings, parse_listen, settings_from_dict
from broker.health import SERVICE_NAME, provider_service
from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BIN = Path(sys.executable).parent
# The caller key the serve test hashes into the config in place of the placeholder.
CALLER_KEY = "mb_test-deploy-caller-5b1e9d7a3c"
ROUND_ROBIN: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
PLACEHOLDER = re.compile(r"0{64}")


# --- manifests -------------------------------------------------------------------------------


@cache
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> document, for every manifest in deploy/k8s except the kustomization."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            for key in ("apiVersion", "kind", "metadata"):
                assert key in doc, f"{path.name}: missing {key}"
            ident = (doc["kind"], doc["metadata"]["name"])
            assert ident not in out, f"{path.name}: {ident} defined twice"
            out[ident] = doc
    return out


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for (k, n), d in manifests().items() if k == kind and (name is None or n == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployment() -> dict[str, Any]:
    return one("Deployment")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = deployment()["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod_spec()["containers"] if c["name"] == "model-broker"]
    (c,) = found
    return c


def grpc_port() -> int:
    (port,) = [p for p in container()["ports"] if p["name"] == "grpc"]
    assert port.get("protocol", "TCP") == "TCP"
    value: int = port["containerPort"]
    return value


def services() -> list[dict[str, Any]]:
    return [d for (k, _), d in manifests().items() if k == "Service"]


def secret() -> dict[str, Any]:
    return one("Secret")


def configmap_config_text() -> str:
    """The broker config the Deployment mounts, from the ConfigMap its volume names."""
    (vol,) = [v for v in pod_spec()["volumes"] if v["name"] == config_mount()["name"]]
    cm = one("ConfigMap", vol["configMap"]["name"])
    (item,) = vol["configMap"]["items"]
    text: str = cm["data"][item["key"]]
    return text


def config_mount() -> dict[str, Any]:
    """The container's mount of the pod's ConfigMap volume."""
    cm_volumes = {v["name"] for v in pod_spec()["volumes"] if "configMap" in v}
    found: list[dict[str, Any]] = [m for m in container()["volumeMounts"] if m["name"] in cm_volumes]
    (mount,) = found
    return mount


def container_env() -> dict[str, str]:
    """The container's environment as the kubelet would set it, Secret values included."""
    sec = secret()
    values = {**sec.get("stringData", {})}
    env: dict[str, str] = {}
    for e in container()["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == sec["metadata"]["name"], f"env {e['name']}: names an unknown Secret"
            assert ref["key"] in values, f"env {e['name']}: the Secret has no key {ref['key']}"
            assert not ref.get("optional"), f"env {e['name']}: a missing key must stop the pod"
            env[e["name"]] = values[ref["key"]]
    return env


def serve_args(argv: list[str]) -> Any:
    """The container's args parsed by the daemon's own CLI parser (unknown flags fail here)."""
    args = build_parser().parse_args(argv)
    assert args.command == "serve"
    return args


def effective_config_path() -> str:
    path: str | None = serve_args(container()["args"]).config or container_env().get("MODEL_BROKER_CONFIG")
    assert path, "the container must pass --config or set MODEL_BROKER_CONFIG"
    return path


def operator_config() -> dict[str, Any]:
    """The ConfigMap's config after the operator's one edit (README "Deploying", step 3): a real
    caller hash in place of the placeholder, which the daemon refuses."""
    raw: dict[str, Any] = yaml.safe_load(configmap_config_text())
    assert PLACEHOLDER.fullmatch(raw["auth"]["keys"][0]["sha256"]), "the ConfigMap ships a placeholder"
    raw["auth"]["keys"][0]["sha256"] = hash_key(CALLER_KEY)
    return raw


def configmap_settings() -> Settings:
    return settings_from_dict(operator_config(), source="ConfigMap", env=container_env())


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(stage name, [(INSTRUCTION, arguments)])] with continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not pending and raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for line in lines:
        if not line.strip():
            continue
        instr, _, rest = line.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.search(r"\s+AS\s+(\S+)$", rest, re.IGNORECASE)
            stages.append((m.group(1) if m else str(len(stages)), []))
        if stages:
            stages[-1][1].append((instr, rest.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [rest for instr, rest in stage if instr == name]


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)  # shell form is not JSON: it fails here
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)
    return parsed


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1][1]


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: last matching line wins; a pattern matching a parent matches too."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = posixpath.normpath(pattern.lstrip("!").strip().lstrip("/"))
        rx = ""
        i = 0
        while i < len(body):
            if body.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif body.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif body[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif body[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(body[i]), i + 1
        if any(re.fullmatch(rx, p) for p in prefixes):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    text = (ROOT / ".dockerignore").read_text()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# --- the manifests agree with each other -----------------------------------------------------


def test_kustomization_lists_every_manifest_except_the_fake_secret() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files - {"secret.example.yaml"}
    for value in secret()["stringData"].values():
        assert "FAKE" in value, "the example Secret must hold obviously fake values"


def test_services_and_pdb_select_the_deployments_pods() -> None:
    pod_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment()["spec"]["selector"]["matchLabels"],
        one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    selectors += [s["spec"]["selector"] for s in services()]
    for sel in selectors:
        assert sel and sel.items() <= pod_labels.items(), f"selector {sel} does not match {pod_labels}"


def test_ports_agree_across_container_probes_services_and_dockerfile() -> None:
    port = grpc_port()
    c = container()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        # The kubelet wants a number here (named ports are refused for grpc probes).
        assert c[probe]["grpc"]["port"] == port, probe
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    for svc in services():
        (sp,) = svc["spec"]["ports"]
        target = sp["targetPort"]
        assert named.get(target, target) == port, f"Service {svc['metadata']['name']} targets {target}"
    (headless,) = [s for s in services() if s["spec"].get("clusterIP") == "None"]
    # Clients dial pod IPs straight from DNS, so the advertised port must be the pod's port.
    assert headless["spec"]["ports"][0]["port"] == port
    assert headless["spec"].get("publishNotReadyAddresses", False) is False
    (cluster_ip,) = [s for s in services() if s["spec"].get("clusterIP") != "None"]
    assert cluster_ip["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert instructions(final_stage(), "EXPOSE") == [str(port)]


def test_the_daemon_listens_on_all_interfaces_at_the_container_port() -> None:
    args = serve_args(container()["args"])
    listen = args.listen or configmap_settings().server.listen
    host, lport = parse_listen(listen)
    assert (host, lport) == ("0.0.0.0", grpc_port()), f"the kubelet probes the pod IP; got {listen}"
    # The image on its own (docker run, no args) listens there too, not on the loopback default.
    cmd = serve_args(exec_form(instructions(final_stage(), "CMD")[0]))
    assert cmd.listen == f"0.0.0.0:{grpc_port()}"


def test_metrics_port_is_the_configs_and_stays_off_the_grpc_services() -> None:
    (mport,) = [p for p in container()["ports"] if p["name"] == "metrics"]
    listen = serve_args(container()["args"]).metrics_listen or configmap_settings().metrics.listen
    assert listen is not None, "the example exposes /metrics"
    assert parse_listen(listen) == ("0.0.0.0", mport["containerPort"])
    annotations = deployment()["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port", str(mport["containerPort"])) == str(mport["containerPort"])
    for svc in services():
        assert all(sp["targetPort"] not in ("metrics", mport["containerPort"]) for sp in svc["spec"]["ports"])


def test_deployed_config_turns_caller_auth_on() -> None:
    # Listening on 0.0.0.0 with auth off would let any pod spend the provider keys.
    settings = configmap_settings()
    assert open_listen_warning(settings, settings.server.listen) is None


def test_probes_ask_the_health_services_the_daemon_registers() -> None:
    c = container()
    for probe in ("startupProbe", "livenessProbe"):
        # Omitted service = "": up and not shutting down; never tied to a provider's health.
        assert c[probe]["grpc"].get("service", "") == "", probe
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert set(c[probe]) & {"exec", "httpGet", "tcpSocket"} == set(), (
            f"{probe}: use the native grpc probe"
        )


def test_grace_period_outlasts_the_drain() -> None:
    spec, c = pod_spec(), container()
    grace = configmap_settings().server.shutdown_grace_seconds
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    if "exec" in pre_stop:
        cmd = pre_stop["exec"]["command"]
        assert cmd[0] == "sleep", f"unexpected preStop {cmd}"
        pre_stop_seconds = float(cmd[1])
    else:
        pre_stop_seconds = float(pre_stop.get("sleep", {}).get("seconds", 0))
    ready = c["readinessProbe"]
    readiness_window = ready.get("periodSeconds", 10) * ready.get("failureThreshold", 3)
    assert spec["terminationGracePeriodSeconds"] > pre_stop_seconds + readiness_window + grace
    # "" turns NOT_SERVING at SIGTERM: liveness must not give up before the drain ends.
    live = c["livenessProbe"]
    assert live.get("periodSeconds", 10) * live.get("failureThreshold", 3) > grace


def test_configmap_config_validates_with_the_containers_environment() -> None:
    text = configmap_config_text()
    env = container_env()
    needed = {m.group(1) for m in VAR.finditer(text) if m.group(2) is None}
    assert needed <= env.keys(), f"the config needs {sorted(needed - env.keys())} from the environment"
    settings = configmap_settings()  # raises ConfigError naming every problem
    assert settings.enabled_providers(), "the example must configure providers"
    for p in yaml.safe_load(text)["providers"]:
        if "api_key" in p:
            assert VAR.fullmatch(p["api_key"]), (
                f"provider {p['name']}: keys come from the Secret, not the ConfigMap"
            )


def test_configmap_placeholder_hash_is_refused_until_the_operator_replaces_it(tmp_path: Path) -> None:
    # As shipped, `config check` (README step 4) and `serve` refuse the placeholder with its
    # path, so a pod can never go Ready with a key no caller has.
    with pytest.raises(ConfigError) as refused:
        settings_from_dict(yaml.safe_load(configmap_config_text()), env=container_env())
    (problem,) = refused.value.problems
    assert problem.startswith("auth.keys[0].sha256: is a placeholder"), problem
    shipped, edited = tmp_path / "shipped.yaml", tmp_path / "edited.yaml"
    shipped.write_text(configmap_config_text())
    edited.write_text(yaml.safe_dump(operator_config()))
    env = {**os.environ, **container_env()}
    cli = [str(BIN / "model-broker"), "config", "check"]
    out = subprocess.run([*cli, str(shipped)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "auth.keys[0].sha256: is a placeholder" in out.stderr, out.stderr
    out = subprocess.run([*cli, str(edited)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_config_is_mounted_read_only_where_the_daemon_reads_it() -> None:
    mount = config_mount()
    assert mount.get("readOnly") is True
    (vol,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    (item,) = vol["configMap"]["items"]
    assert effective_config_path() == posixpath.join(mount["mountPath"], item["path"])


def test_pod_runs_non_root_on_a_read_only_root_filesystem_with_resources() -> None:
    spec, c = pod_spec(), container()
    assert spec["securityContext"]["runAsNonRoot"] is True
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    assert "memory" in c["resources"]["limits"]
    # runAsNonRoot can only verify a numeric USER; the pod's uid is the image's.
    (user,) = instructions(final_stage(), "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user} must be a numeric non-root uid"
    assert spec["securityContext"]["runAsUser"] == int(uid)
    # Kubernetes would otherwise inject MODEL_BROKER_PORT=tcp://... for the Service.
    assert spec.get("enableServiceLinks") is False


def test_dockerfile_builds_a_venv_and_runs_the_console_script_in_exec_form() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    builder_name, builder = stages[0]
    bases = {instructions(s, "FROM")[0].split()[0] for _, s in stages}
    assert len(bases) == 1, "the copied venv needs the same Python in both stages"
    runtime = final_stage()
    copies = [shlex.split(a) for a in instructions(runtime, "COPY") if a.startswith("--from=")]
    assert [c for c in copies if c[0] == f"--from={builder_name}"], "the runtime copies the builder's venv"
    venv = copies[0][-1]
    assert any("pip wheel --no-deps" in r and "pip install" in r for r in instructions(builder, "RUN"))
    entry = exec_form(instructions(runtime, "ENTRYPOINT")[0])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == [f"{venv}/bin/model-broker"] and "model-broker" in scripts
    assert exec_form(instructions(runtime, "CMD")[0])[0] == "serve"
    assert all("pip" not in r for r in instructions(runtime, "RUN")), "build in the builder stage"


def test_dockerignore_keeps_secrets_and_clutter_out_of_the_context() -> None:
    pats = dockerignore_patterns()
    for path in (
        ".env",
        ".venv/bin/python",
        "tests/conftest.py",
        ".git/config",
        "bench/results/x.json",
        "broker/__pycache__/cli.cpython-311.pyc",
        "model_broker.egg-info/PKG-INFO",
    ):
        assert docker_ignored(path, pats), f"{path} would be sent to the Docker daemon"
    for path in (
        "pyproject.toml",
        "README.md",
        "broker/catalog/models.json",
        "broker/presets/development.yaml",
        "clients/python/modelbroker/v1/broker_pb2.py",
    ):
        assert not docker_ignored(path, pats), f"{path} is needed to build the package"


# --- what can run without Docker -------------------------------------------------------------


def build_context(dest: Path) -> Path:
    """Lay out the builder stage's WORKDIR from its COPY lines, honouring .dockerignore."""
    builder = dockerfile_stages()[0][1]
    (workdir,) = instructions(builder, "WORKDIR")
    pats = dockerignore_patterns()
    src_root = dest / workdir.lstrip("/")
    src_root.mkdir(parents=True)
    for args in (shlex.split(a) for a in instructions(builder, "COPY")):
        *sources, target = args
        for source in sources:
            origin = ROOT / source
            files = [origin] if origin.is_file() else sorted(p for p in origin.rglob("*") if p.is_file())
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if docker_ignored(rel, pats):
                    continue
                inner = f.name if origin.is_file() else f.relative_to(origin).as_posix()
                out = src_root / target / inner
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
    return src_root


def test_the_wheel_the_image_installs_carries_data_files_and_stubs(tmp_path: Path) -> None:
    src = build_context(tmp_path / "context")
    wheels = tmp_path / "wheels"
    # --no-build-isolation: the venv's setuptools, no index needed; the image build gets its own.
    subprocess.run(
        [
            str(BIN / "pip"),
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--wheel-dir",
            str(wheels),
            str(src),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    (wheel,) = wheels.glob("model_broker-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "broker/catalog/models.json" in names
    presets = {f"broker/presets/{p.name}" for p in (ROOT / "broker" / "presets").glob("*.yaml")}
    assert presets and presets <= names
    for stub in ("__init__.py", "broker_pb2.py", "broker_pb2_grpc.py"):
        assert f"modelbroker/v1/{stub}" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "model-broker = broker.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def health_status(target: str, service: str) -> int | grpc.StatusCode:
    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError as err:
            code: grpc.StatusCode = err.code()
            return code
        status: int = resp.status
        return status


def test_serve_with_the_configmap_config_answers_the_probes_and_stops_on_sigterm(tmp_path: Path) -> None:
    # The operator's one edit: a real caller hash in place of the placeholder.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(operator_config()))
    argv = list(container()["args"])
    argv[argv.index("--config") + 1] = str(config)
    target = f"127.0.0.1:{free_loopback_port()}"
    metrics_at = f"127.0.0.1:{free_loopback_port()}"
    with socket.socket() as dead:
        # Bound but not listening: providers get "connection refused" from this port for the
        # whole test, and nothing else can take it meanwhile.
        dead.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{dead.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_BROKER_", "OLLAMA_"))}
        env.update(container_env(), OPENAI_BASE_URL=f"{down}/v1", ANTHROPIC_BASE_URL=down)
        # Output to files, not pipes: a chatty daemon must not block on a full pipe.
        out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
        with out_path.open("w") as out_f, err_path.open("w") as err_f:
            proc = subprocess.Popen(
                [str(BIN / "model-broker"), *argv, "--listen", target, "--metrics-listen", metrics_at],
                env=env,
                stdout=out_f,
                stderr=err_f,
            )
        try:
            deadline = time.monotonic() + 10
            live: int | grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
            while time.monotonic() < deadline and proc.poll() is None:
                live = health_status(target, "")  # no key, like the kubelet
                if live == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.1)
            assert live == health_pb2.HealthCheckResponse.SERVING, f"liveness never passed: {live}"
            # Every provider refuses connections: not ready, yet alive (no restart storm).
            assert health_status(target, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
            providers = {p.name for p in configmap_settings().providers}
            for name in providers:
                assert (
                    health_status(target, provider_service(name))
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                )
            # The client-side balancing config the README gives for the headless Service.
            options = [("grpc.service_config", json.dumps(ROUND_ROBIN))]
            with grpc.insecure_channel(f"dns:///{target}", options=options) as ch:
                broker = pb_grpc.ModelBrokerStub(ch)
                with pytest.raises(grpc.RpcError) as refused:
                    broker.ListProviders(pb.ListProvidersRequest(), timeout=2)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                listed = broker.ListProviders(
                    pb.ListProvidersRequest(), timeout=2, metadata=[("authorization", f"Bearer {CALLER_KEY}")]
                )
            # The config's ${..._BASE_URL:-default} took the environment's value: this test
            # talked to the refusing port, never to a vendor.
            assert {p.name for p in listed.providers} == providers
            assert all(p.base_url.startswith(down) for p in listed.providers), listed
            # What the scraper sees agrees with the probes.
            with urllib.request.urlopen(f"http://{metrics_at}/metrics", timeout=2) as resp:
                samples = {
                    (s.name, s.labels.get("provider", "")): s.value
                    for fam in text_string_to_metric_families(resp.read().decode())
                    for s in fam.samples
                }
            assert samples[("modelbroker_ready", "")] == 0
            assert all(samples[("modelbroker_provider_healthy", name)] == 0 for name in providers)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "caller auth is off" not in err
    assert "discovery_failed" in err or "provider_health" in err, "the scan below needs the daemon's log"
    for key in [*secret()["stringData"].values(), CALLER_KEY]:
        assert key not in out + err, "a provider or caller key reached the daemon's output"
