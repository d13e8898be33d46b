"""deploy/: Kubernetes manifests valid for Kubernetes, and consistent with catflap itself.

Built-in kinds are checked offline against the JSON schemas that the ``kubernetes-validate``
package ships (strict: unknown fields are errors). The KEDA ScaledObject is a CRD without a
schema there, so its required fields are checked by hand. The rest checks what no schema can:
ports, probes, grace periods against the drain, selectors, and that the ConfigMap's
catflap.toml loads with catflap's own loader. The agent pods' probe script runs against a real
runtime process and a real Redis.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from catflap.auth.tokens import KeyRing
from catflap.cluster.dispatch import DISPATCH_LUA
from catflap.cluster.keys import Keys
from catflap.config import CatflapConfig, load_config
from catflap.contract import limits

from .conftest import ECHO, ROOT, seconds

K8S = ROOT / "deploy" / "kubernetes"
DOCKER = ROOT / "deploy" / "docker"
PROBE_SCRIPT = DOCKER / "catflap-agent-probe.py"
#: The oldest Kubernetes these manifests promise to fit, and the newest the validator knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
#: Documents the validator has no schema for, and why that is fine.
NO_SCHEMA = {
    ("keda.sh/v1alpha1", "ScaledObject"),  # a CRD: checked by hand below
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),  # kustomize's input, not an object
}
REDIS_URL = os.environ.get("CATFLAP_TEST_REDIS", "redis://127.0.0.1:6379/0")

Doc = dict[str, Any]


def _documents() -> list[tuple[Path, Doc]]:
    found: list[tuple[Path, Doc]] = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                found.append((path, doc))
    return found


DOCUMENTS = _documents()


def _doc_id(item: tuple[Path, Doc]) -> str:
    path, doc = item
    return f"{path.relative_to(K8S)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _find(kind: str, name: str) -> Doc:
    matches = [
        doc
        for _, doc in DOCUMENTS
        if doc.get("kind") == kind and doc.get("metadata", {}).get("name") == name
    ]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _all(kind: str) -> list[Doc]:
    return [doc for _, doc in DOCUMENTS if doc.get("kind") == kind]


def _container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Doc = containers[0]
    return container


def _args(container: Doc) -> list[str]:
    """The container's command line with Kubernetes' ``$(VAR)`` expansion of literal env."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    words = [*container.get("command", []), *container.get("args", [])]
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(w)) for w in words]


def _option(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} given {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


def _container_port(container: Doc, port: int | str) -> int:
    """A port reference (number or name) resolved against the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"no container port named {port!r}"
    return int(named[port])


def _config_text() -> str:
    text: str = _find("ConfigMap", "catflap-config")["data"]["catflap.toml"]
    return text


def _config() -> CatflapConfig:
    return CatflapConfig.model_validate(tomllib.loads(_config_text()))


def _pod_labels(deployment: Doc) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


GATEWAY = _find("Deployment", "catflap-gateway")
AGENT = _find("Deployment", "my-agent")


# --- every document ------------------------------------------------------------------------


def test_there_are_manifests_and_each_document_is_an_object() -> None:
    assert len(DOCUMENTS) >= 15
    for path, doc in DOCUMENTS:
        assert isinstance(doc, dict), path
        assert doc.get("apiVersion") and doc.get("kind"), path
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), path


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", DOCUMENTS, ids=_doc_id)
def test_document_validates_against_the_kubernetes_schema(
    item: tuple[Path, Doc], version: str
) -> None:
    _, doc = item
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except SchemaNotFoundError:
        assert (doc["apiVersion"], doc["kind"]) in NO_SCHEMA


def test_every_object_lives_in_the_catflap_namespace() -> None:
    for path, doc in DOCUMENTS:
        if doc["kind"] in ("Namespace", "Kustomization"):
            continue
        assert doc["metadata"].get("namespace") == "catflap", _doc_id((path, doc))
    assert _find("Namespace", "catflap")


def test_kustomization_lists_every_base_manifest_and_nothing_else() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "catflap"
    listed = set(kustomization["resources"])
    base = {
        p.name
        for p in K8S.glob("*.yaml")
        if p.name != "kustomization.yaml" and not p.name.endswith(".template.yaml")
    }
    assert listed == base
    # The Secret template stays out: applying it again would overwrite the real keys.
    assert not any(name.endswith(".template.yaml") for name in listed)


# --- the KEDA ScaledObject (a CRD the validator has no schema for) ---------------------------


def test_keda_scaled_object_has_the_fields_keda_requires() -> None:
    (scaled,) = _all("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["name"] and scaled["metadata"]["namespace"] == "catflap"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == AGENT["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = spec["triggers"]
    assert isinstance(triggers, list) and triggers
    for trigger in triggers:
        assert isinstance(trigger["type"], str)
        # KEDA reads trigger metadata as a map of strings.
        assert all(isinstance(v, str) for v in trigger["metadata"].values())
    (prometheus,) = [t for t in triggers if t["type"] == "prometheus"]
    metadata = prometheus["metadata"]
    assert {"serverAddress", "query", "threshold"} <= set(metadata)
    agent_key = _option(_args(_container(AGENT)), "--agent")
    assert 'state="idle"' in metadata["query"]
    assert f'agent="{agent_key}"' in metadata["query"]
    assert "catflap_pool_instances" in metadata["query"]
    # desired pods = busy instances + spare, divided by instances per pod.
    assert float(metadata["threshold"]) == int(_option(_args(_container(AGENT)), "--slots"))


def test_autoscalers_stay_under_the_cluster_wide_max_agents() -> None:
    """An instance refused registration at max_agents is stopped and respawned in a loop."""
    args = _args(_container(AGENT))
    agent_key = _option(args, "--agent")
    slots = int(_option(args, "--slots"))
    max_agents = next(a for a in _config().agents() if a.key == agent_key).config.scaling.max_agents
    (hpa,) = _all("HorizontalPodAutoscaler")
    (scaled,) = _all("ScaledObject")
    assert hpa["spec"]["scaleTargetRef"]["name"] == AGENT["metadata"]["name"]
    assert hpa["spec"]["maxReplicas"] * slots <= max_agents
    assert scaled["spec"]["maxReplicaCount"] * slots <= max_agents
    assert AGENT["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


# --- the ConfigMap's catflap.toml ----------------------------------------------------------


def test_config_toml_loads_with_catflaps_loader(tmp_path: Path) -> None:
    bot = tmp_path / "bot"
    bot.mkdir()
    (bot / "bot.py").write_text("async def bot(args):\n    pass\n")
    text, count = re.subn(r'^path = ".*"$', f'path = "{bot}"', _config_text(), flags=re.M)
    assert count == len(list(_config().agents())) >= 1
    (tmp_path / "catflap.toml").write_text(text)
    cfg = load_config(tmp_path / "catflap.toml")
    assert cfg.public_url is not None and cfg.public_url.startswith("wss://")
    assert cfg.database_url is None or cfg.database_url.startswith("postgres")
    for agent in cfg.agents():
        # Gateways do not see the bot folder's pcc-deploy.toml: the config must be explicit.
        raw = tomllib.loads(_config_text())["organizations"][agent.service_host.org]
        explicit = raw["agents"][agent.service_host.agent]
        assert {"websocket_auth", "max_session_duration", "scaling"} <= set(explicit)


def test_secret_template_placeholder_cannot_sign_tokens() -> None:
    (secret,) = _all("Secret")
    value = secret["stringData"]["CATFLAP_TOKEN_KEYS"]
    assert "REPLACE" in value
    with pytest.raises(ValueError):
        KeyRing.from_env(value)


# --- gateways ------------------------------------------------------------------------------


def test_gateway_port_is_the_same_everywhere() -> None:
    container = _container(GATEWAY)
    args = _args(container)
    assert args[:2] == ["catflap", "gateway"]
    listen_port = int(_option(args, "--listen").rpartition(":")[2])
    assert listen_port == 8080
    # http: relay and API; metrics: [gateway] metrics_listen, where the annotations scrape.
    metrics = _config().gateway.metrics_host_port
    assert metrics is not None and metrics[0] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": listen_port, "metrics": metrics[1]}
    scrape = GATEWAY["spec"]["template"]["metadata"]["annotations"]
    assert scrape["prometheus.io/port"] == str(metrics[1])
    assert scrape["prometheus.io/path"] == "/metrics"
    policy = _find("NetworkPolicy", "gateways-metrics-from-monitoring")["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], _pod_labels(GATEWAY))
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [metrics[1]]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert _container_port(container, get["port"]) == listen_port
    service = _find("Service", "catflap-gateway")
    assert service["spec"]["sessionAffinity"] == "None"
    assert _selects(service["spec"]["selector"], _pod_labels(GATEWAY))
    (service_port,) = service["spec"]["ports"]
    assert _container_port(container, service_port["targetPort"]) == listen_port
    for ingress in _all("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path_rule in rule["http"]["paths"]:
                backend = path_rule["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert (
                    backend["port"].get("name") == service_port["name"]
                    or backend["port"].get("number") == service_port["port"]
                )


def test_gateway_grace_period_covers_prestop_and_drain() -> None:
    pod = GATEWAY["spec"]["template"]["spec"]
    pre_stop = _container(GATEWAY)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain_timeout = _config().gateway.drain_timeout
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain_timeout + 30
    # No session that starts before a drain is cut by it.
    assert all(a.config.max_session_duration <= drain_timeout for a in _config().agents())
    # The ALB example keeps a terminating gateway's connections as long as the drain.
    alb = _find("Ingress", "catflap-alb")["metadata"]["annotations"]
    delay = alb["alb.ingress.kubernetes.io/target-group-attributes"]
    assert delay == f"deregistration_delay.timeout_seconds={int(drain_timeout)}"
    idle = alb["alb.ingress.kubernetes.io/load-balancer-attributes"]
    assert idle == "idle_timeout.timeout_seconds=4000"
    nginx = _find("Ingress", "catflap")["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(nginx[f"nginx.ingress.kubernetes.io/{key}"]) >= drain_timeout


def test_gateway_gets_config_keys_and_a_bot_stub_at_every_agent_path() -> None:
    container = _container(GATEWAY)
    pod = GATEWAY["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    config_path = Path(_option(_args(container), "--config"))
    assert mounts[str(config_path.parent)]["configMap"]["name"] == "catflap-config"
    assert config_path.name in _find("ConfigMap", "catflap-config")["data"]
    for agent in _config().agents():
        stub = mounts[str(agent.config.path)]["configMap"]["name"]
        assert "bot.py" in _find("ConfigMap", stub)["data"]
    (secret,) = _all("Secret")
    (keys,) = [e for e in container["env"] if e["name"] == "CATFLAP_TOKEN_KEYS"]
    ref = keys["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


def test_state_dir_is_writable_in_gateway_and_agent_pods() -> None:
    state_dir = str(_config().state_dir)
    assert state_dir.startswith("/")  # not below the read-only config mount
    for deployment in (GATEWAY, AGENT):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in _container(deployment)["volumeMounts"]}
        assert state_dir in mounts, deployment["metadata"]["name"]
        assert not mounts[state_dir].get("readOnly", False)
        assert "emptyDir" in volumes[mounts[state_dir]["name"]]


def test_gateways_and_agents_use_the_redis_service() -> None:
    service = _find("Service", "redis")
    (port,) = service["spec"]["ports"]
    expected = f"redis://{service['metadata']['name']}:{port['port']}/0"
    for deployment in (GATEWAY, AGENT):
        assert _option(_args(_container(deployment)), "--redis") == expected
    (redis_set,) = _all("StatefulSet")
    assert _selects(
        service["spec"]["selector"], redis_set["spec"]["template"]["metadata"]["labels"]
    )


# --- agent pods ----------------------------------------------------------------------------


def test_agent_host_command_matches_the_config_and_the_pod() -> None:
    container = _container(AGENT)
    args = _args(container)
    assert args[:2] == ["catflap", "agent-host"]
    assert _option(args, "--agent") in {a.key for a in _config().agents()}
    assert _option(args, "--advertise") == "$(POD_IP)"
    (pod_ip,) = [e for e in container["env"] if e["name"] == "POD_IP"]
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # Runtimes listen on random ports: nothing to declare, nothing a Service could point at.
    assert "ports" not in container
    assert not [
        s for s in _all("Service") if _selects(s["spec"].get("selector", {}), _pod_labels(AGENT))
    ]
    agent = next(a for a in _config().agents() if a.key == _option(args, "--agent"))
    assert str(agent.config.path) == "/app"  # where Dockerfile.agent puts the bot
    assert "COPY . /app" in (DOCKER / "Dockerfile.agent").read_text()


def test_agent_probes_and_drain_use_the_probe_script() -> None:
    container = _container(AGENT)
    dockerfile = (DOCKER / "Dockerfile.agent").read_text()
    assert "deploy/docker/catflap-agent-probe.py /usr/local/bin/catflap-agent-probe" in dockerfile
    for probe, mode in (
        ("startupProbe", "started"),
        ("readinessProbe", "ready"),
        ("livenessProbe", "live"),
    ):
        assert container[probe]["exec"]["command"] == ["catflap-agent-probe", mode]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["catflap-agent-probe", "drain"]
    drain_s = float(_option(pre_stop, "--timeout"))
    agent = next(a for a in _config().agents() if a.key == _option(_args(container), "--agent"))
    assert drain_s >= agent.config.max_session_duration
    grace = AGENT["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= drain_s + 30
    env = {e["name"]: e.get("value") for e in container["env"]}
    args = _args(container)
    assert env["CATFLAP_AGENT"] == _option(args, "--agent")
    assert env["CATFLAP_REDIS_URL"] == _option(args, "--redis")
    assert env["CATFLAP_PREFIX"] == _option(args, "--prefix")


def test_disruption_budgets_and_network_policies_select_the_right_pods() -> None:
    budgets = _all("PodDisruptionBudget")
    for deployment in (GATEWAY, AGENT):
        labels = _pod_labels(deployment)
        assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
        covering = [b for b in budgets if _selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(covering) == 1
    agents_policy = _find("NetworkPolicy", "agents-from-gateways")
    assert _selects(agents_policy["spec"]["podSelector"]["matchLabels"], _pod_labels(AGENT))
    (rule,) = agents_policy["spec"]["ingress"]
    # Runtime ports are ephemeral: the rule must not narrow ports.
    assert "ports" not in rule
    (peer,) = rule["from"]
    assert _selects(peer["podSelector"]["matchLabels"], _pod_labels(GATEWAY))


# --- the agent pods' probe script, on real processes ----------------------------------------


def _load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("catflap_agent_probe", PROBE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_decodes_proc_net_addresses() -> None:
    probe = _load_probe()
    assert probe._decode_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert probe._decode_address("0502000A:0050") == ("10.0.2.5", 80)
    assert probe._decode_address("00000000000000000000000001000000:1F90") == ("::1", 8080)
    assert probe._address_prefix("10.1.2.3") == "tcp:10.1.2.3:"
    assert probe._address_prefix("fd00::1") == "tcp:[fd00::1]:"


@pytest.fixture
def runtime() -> Iterator[tuple[str, int]]:
    """A real agent runtime on a random TCP port, as `catflap agent-host` starts them."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "catflap.runtime.main",
            "--bot-dir",
            str(ECHO),
            "--listen",
            "tcp:127.0.0.1:0",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on tcp:([\d.]+):(\d+)", line)
        assert match, f"unexpected first line from the runtime: {line!r}"
        yield match[1], int(match[2])
    finally:
        process.terminate()
        try:
            process.wait(timeout=seconds(10))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_probe_finds_a_runtime_and_its_health_routes(runtime: tuple[str, int]) -> None:
    probe = _load_probe()
    assert runtime in probe.runtime_addresses()
    assert probe._http_ok(*runtime, "/readyz")
    assert probe._http_ok(*runtime, "/livez")
    assert probe.check("/readyz") == 0


def test_probe_ready_also_needs_redis_and_started_does_not(
    runtime: tuple[str, int],
    redis_client: tuple[redis.Redis, Keys],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = _load_probe()
    monkeypatch.delenv("CATFLAP_REDIS_URL", raising=False)
    assert probe.main(["ready"]) == 0  # no Redis configured: the runtime alone
    monkeypatch.setenv("CATFLAP_REDIS_URL", REDIS_URL)
    assert probe.main(["ready"]) == 0
    with socket.socket() as closed:  # a port nothing listens on: Redis is down
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("CATFLAP_REDIS_URL", f"redis://127.0.0.1:{closed.getsockname()[1]}/0")
    started = time.monotonic()
    assert probe.main(["ready"]) == 1
    assert time.monotonic() - started < limits.READINESS_CHECK_TIMEOUT_S + seconds(1)
    assert probe.main(["started"]) == 0


@pytest.fixture
def redis_client() -> Iterator[tuple[redis.Redis, Keys]]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    keys = Keys(f"cfprobe-{uuid.uuid4().hex[:8]}")
    try:
        yield client, keys
    finally:
        leftovers = list(client.scan_iter(f"{keys.prefix}:*"))
        if leftovers:
            client.delete(*leftovers)
        client.close()


def _register(client: redis.Redis, keys: Keys, agent: str, iid: str, address: str) -> None:
    client.hset(
        keys.instance(iid),
        mapping={"agent": agent, "address": address, "capacity": 1, "state": "ready"},
    )
    client.pexpire(keys.instance(iid), 60_000)
    client.sadd(keys.agent_instances(agent), iid)


def test_probe_drain_stops_dispatch_to_this_pod_and_waits_for_its_sessions(
    redis_client: tuple[redis.Redis, Keys], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, keys = redis_client
    agent = "my-agent.my-org"
    _register(client, keys, agent, "mine-1", "tcp:10.0.0.5:40001")
    _register(client, keys, agent, "other-1", "tcp:10.0.0.6:40001")
    client.sadd(keys.agent_instances(agent), "gone-1")
    client.sadd(keys.active("mine-1"), "session-a")
    monkeypatch.setenv("POD_IP", "10.0.0.5")
    monkeypatch.setenv("CATFLAP_AGENT", agent)
    monkeypatch.setenv("CATFLAP_PREFIX", keys.prefix)
    monkeypatch.setenv("CATFLAP_REDIS_URL", REDIS_URL)
    probe = _load_probe()
    monkeypatch.setattr(probe, "DRAIN_POLL_S", 0.05)

    # A session still runs here: the drain waits until its timeout.
    started = time.monotonic()
    assert probe.drain(0.3) == 0
    assert time.monotonic() - started >= 0.3
    assert client.hget(keys.instance("mine-1"), "state") == b"draining"
    assert client.pttl(keys.instance("mine-1")) > 0  # the heartbeat TTL is kept
    assert client.hget(keys.instance("other-1"), "state") == b"ready"
    assert not client.exists(keys.instance("gone-1"))  # no hash created for a dead id

    # catflap's own dispatch script no longer picks the draining instance.
    dispatch = client.register_script(DISPATCH_LUA)
    now_ms = int(time.time() * 1000)
    for draw in range(4):  # whatever the random draw, other-1 is chosen
        chosen, _, live, outcome = dispatch(
            keys=[
                keys.agent_instances(agent),
                keys.agent_hosts(agent),
                keys.waiting(agent),
            ],
            args=[keys.prefix, now_ms, str(uuid.uuid4()), now_ms + 15_000, draw, 50, "", "", 1],
        )
        assert chosen == b"other-1" and live == 2 and outcome == b"ok"
        client.delete(keys.reserved("other-1"))

    # Once the session is gone, the drain returns promptly.
    client.srem(keys.active("mine-1"), "session-a")
    started = time.monotonic()
    assert probe.drain(30) == 0
    assert time.monotonic() - started < seconds(5)


# --- docs/scaling.md -----------------------------------------------------------------------


def test_scaling_doc_names_every_redis_key_and_stream() -> None:
    text = (ROOT / "docs" / "scaling.md").read_text()
    keys = Keys("catflap")
    patterns = [
        keys.instance("{id}"),
        keys.active("{id}"),
        keys.reserved("{id}"),
        keys.agent_instances("{agent}.{org}"),
        keys.agent_hosts("{agent}.{org}"),
        keys.waiting("{agent}.{org}"),
        keys.jti("{jti}"),
        keys.session("{session_id}"),
        keys.agent_sessions("{org}", "{agent}"),
        keys.secret_sets("{org}"),
        keys.session_log("{org}", "{agent}", "{session_id}"),
        keys.agent_logs("{org}", "{agent}"),
        keys.stop_stream,
        keys.ended_stream,
        keys.ready_channel,
        keys.gateway("{id}"),
        keys.gateways,
        keys.gateway_sessions("{id}"),
        keys.gateway_claim("{id}"),
    ]
    for pattern in patterns:
        assert f"`{pattern}`" in text, pattern
    # session_log_prefix is session_log's front part (for the shipping script), no key.
    public = {name for name in vars(Keys) if not name.startswith("_")} - {
        "prefix",
        "session_log_prefix",
    }
    assert len(public) == len(patterns), "a Redis key was added: document it in scaling.md"
