"""deploy/prometheus/ with Debian's Prometheus 2.42: the rules check and pass their unit tests, and a real
Prometheus server scrapes a real `python -m service`, evaluates the rules on it, and answers for its series.

promtool and prometheus come from scripts/system-deps (Debian's `prometheus` package): without them a test skips
on a developer's machine and fails in CI (tests/system.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import ROOT, Server, free_port, image_bytes, running_service, wait_until_ok
from tests.system import require_executable

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules.test.yml"
SCALED_OBJECT = ROOT / "deploy" / "k8s" / "extras" / "scaledobject-queue-depth.yaml"
JOB = "car-classifier"
NAMESPACE = "default"  # the namespace KEDA's query names; a Kubernetes scrape would add the label itself


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    command = [require_executable("promtool"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_check() -> None:
    run = _promtool("check", "rules", str(RULES))
    assert run.returncode == 0, run.stdout + run.stderr
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in run.stdout
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    assert alerts == {
        "CarClassifierErrors",
        "CarClassifierShedding",
        "CarClassifierLatencyHigh",
        "CarClassifierQueueDeep",
        "CarClassifierConfidenceDrop",
    }


def test_every_alert_is_unit_tested_firing() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert firing == {rule["alert"] for rule in rules if "alert" in rule}


def test_rules_pass_their_unit_tests() -> None:
    run = _promtool("test", "rules", str(RULES_TEST))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


@pytest.mark.parametrize(
    "old, new, why",
    [
        (',status!="503"', "", "shedding counted as errors"),
        ("and namespace_job:prediction_top1_probability:count1h >= 100", "", "a quiet hour judged"),
        ("for: 30m", "for: 0m", "a drop alerted before it lasted"),
    ],
)
def test_the_unit_tests_fail_for_a_wrong_rule(tmp_path: Path, old: str, new: str, why: str) -> None:
    rules = RULES.read_text()
    assert rules.count(old) == 1, old
    (tmp_path / "rules.yml").write_text(rules.replace(old, new))
    (tmp_path / "rules.test.yml").write_text(RULES_TEST.read_text())
    run = _promtool("test", "rules", "rules.test.yml", cwd=tmp_path)
    assert run.returncode != 0, f"the unit tests passed with {why}"
    assert "FAILED" in run.stdout + run.stderr


# --- A real Prometheus scraping a real service ---


def _start_prometheus(target: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}]}
        ],
    }
    (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    command = [
        require_executable("prometheus"),
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    return process, f"http://127.0.0.1:{port}"


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    assert response.status_code == 200, (response.status_code, response.text)
    answer = response.json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def _poll(prometheus: str, expr: str, log: Path, timeout: float = 30) -> list[dict[str, Any]]:
    """The query's result once it has one (the first scrapes and rule evaluations take a second or two)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = _query(prometheus, expr)
            if result:
                return result
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise AssertionError(f"Prometheus had no {expr} after {timeout:g} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def scraped(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, Path]]:
    folder = tmp_path_factory.mktemp("prometheus")
    with running_service(tiny_artifact, folder / "service.log") as server:
        process, prometheus = _start_prometheus(server.url.removeprefix("http://"), folder)
        try:
            # Before it is ready its API can answer 503 with a body that is not JSON.
            wait_until_ok(f"{prometheus}/-/ready", lambda: (folder / "prometheus.log").read_text()[-3000:])
            yield server, prometheus, folder / "prometheus.log"
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_prometheus_scrapes_the_service_and_answers_for_its_series(scraped: tuple[Server, str, Path]) -> None:
    server, prometheus, log = scraped
    for colour in ((200, 10, 10), (10, 200, 10), (10, 10, 200)):
        answer = httpx.post(
            f"{server.url}/infer", content=image_bytes(colour), headers={"content-type": "image/png"}, timeout=30
        )
        assert answer.status_code == 200, answer.text
    (up,) = _poll(prometheus, f'up{{job="{JOB}"}}', log)
    assert up["value"][1] == "1", f"the scrape failed:\n{log.read_text()[-3000:]}"
    (model,) = _poll(prometheus, f'model_info{{job="{JOB}"}}', log)
    ours = httpx.get(f"{server.url}/metrics", timeout=10).text
    (line,) = [line for line in ours.splitlines() if line.startswith("model_info{")]
    sha256 = re.search(r'sha256="([0-9a-f]{64})"', line)
    assert sha256 is not None, line
    assert model["metric"]["name"] == "tiny-colour-classifier"
    assert model["metric"]["sha256"] == sha256.group(1)
    assert model["metric"]["namespace"] == NAMESPACE
    assert model["value"][1] == "1"
    (depth,) = _poll(prometheus, f'inference_queue_depth{{job="{JOB}"}}', log)
    assert depth["value"][1] == "0"  # nothing waits once the three answers are back
    # Our three answers, counted by the service and read back through Prometheus (a later scrape may be needed).
    deadline = time.monotonic() + 30
    served = f'http_requests_total{{job="{JOB}",route="/infer",status="200"}}'
    while (result := _query(prometheus, served)) == [] or result[0]["value"][1] != "3":
        assert time.monotonic() < deadline, f"{served}: {result}"
        time.sleep(0.2)
    # What the confidence rules read: the three answers' top-1 probabilities, and the inputs' formats.
    (confidence,) = _poll(prometheus, f'prediction_top1_probability_count{{job="{JOB}"}}', log)
    assert confidence["value"][1] == "3"
    (png,) = _poll(prometheus, f'input_format_total{{job="{JOB}",format="PNG"}}', log)
    assert png["value"][1] == "3"


def test_the_rules_evaluate_on_the_real_series(scraped: tuple[Server, str, Path]) -> None:
    _, prometheus, log = scraped
    (recorded,) = _poll(prometheus, "namespace_job:inference_queue_depth:mean1m", log)
    assert recorded["metric"] == {
        "__name__": "namespace_job:inference_queue_depth:mean1m",
        "job": JOB,
        "namespace": NAMESPACE,
    }
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {group["name"] for group in groups} == {"car-classifier.recording", "car-classifier.alerts"}
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] in ("ok", "unknown"), rule  # unknown: not evaluated yet; err: a broken rule
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert alerts == [], "a healthy, idle service raises no alert"


def test_kedas_query_gives_the_single_number_keda_needs(scraped: tuple[Server, str, Path]) -> None:
    """KEDA's Prometheus scaler refuses an answer of several series and, with ignoreNullValues off, an empty one."""
    _, prometheus, log = scraped
    (trigger,) = [t for t in yaml.safe_load(SCALED_OBJECT.read_text())["spec"]["triggers"] if t["type"] == "prometheus"]
    query = trigger["metadata"]["query"]
    assert f'namespace="{NAMESPACE}"' in query
    result = _poll(prometheus, query, log)
    assert len(result) == 1 and float(result[0]["value"][1]) == 0.0, result
