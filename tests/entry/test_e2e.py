"""End to end with real processes: an entry (API keys on) and SmolLM2 nodes over real libp2p,
driven through HTTP with httpx and the official openai client."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import httpx
import pytest

from tests.support.node_procs import mesh_cmd, spawn_entry, spawn_node, wait_ready_sync

pytestmark = pytest.mark.slow

# No prefix cache: these tests compare two generations of one prompt (streamed and not), and a
# sequence's numbers shift slightly with where a cached prefix left its cells (engine/
# batched.py), so a seeded sampled answer may differ at a near-tie. A lone sequence in an empty
# cache is exact. Prefix reuse has its own tests (tests/engine, tests/node, tests/verify).
NODE_ARGS = ("--threads", "1", "--skip-benchmark", "--advert-interval", "1", "--prefix-cache-tokens", "0")
COUNTING = "Continue the list: 1, 2, 3, 4, 5, 6,"


def create_key(db, name: str, *extra: str) -> str:
    out = subprocess.run(mesh_cmd("entry", "keys", "create", "--name", name, "--db", str(db), *extra),
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip().splitlines()[-1]


def wait_nodes(url: str, n: int, key: str, limit: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()["data"]
            if sum(m["nodes"] for m in data) == n:
                return data
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"the entry did not see {n} node(s) within {limit} s")


class Mesh:
    def __init__(self, tmp):
        self.tmp = tmp
        self.db = tmp / "keys.db"
        self.key = create_key(self.db, "tester")
        self.slow_key = create_key(self.db, "limited", "--rpm", "2")
        self.entry = spawn_entry(tmp, "entry", "--keys-db", str(self.db), "--token-timeout", "5")
        info = wait_ready_sync(self.entry, 60)
        self.url, self.bootstrap = info["url"], info["p2p_addrs"][0]
        self.nodes = []

    def add_node(self, name: str):
        node = spawn_node(self.tmp, name, "--bootstrap", self.bootstrap, *NODE_ARGS)
        info = wait_ready_sync(node, 120)
        node.peer_id, node.addrs = info["peer_id"], info["addrs"]
        self.nodes.append(node)
        return node

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def close(self):
        for p in self.nodes + [self.entry]:
            p.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, smollm2_path):
    m = Mesh(tmp_path_factory.mktemp("e2e"))
    try:
        m.add_node("node1")
        m.add_node("node2")
        m.model = wait_nodes(m.url, 2, m.key)[0]["id"]
        yield m
    finally:
        m.close()


def chat(mesh, content: str, **extra) -> httpx.Response:
    body = {"model": mesh.model, "messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0, **extra}
    return httpx.post(f"{mesh.url}/v1/chat/completions", json=body, headers=mesh.auth, timeout=60)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_lists_the_model_with_both_nodes(mesh):
    r = httpx.get(f"{mesh.url}/v1/models", headers=mesh.auth, timeout=10)
    assert r.status_code == 200
    (m,) = [m for m in r.json()["data"] if m["owned_by"] == "mesh"]
    assert m["id"] == mesh.model and m["nodes"] == 2 and m["object"] == "model"


def test_chat_streaming_equals_non_streaming(mesh):
    whole = chat(mesh, "Name three colors.")
    assert whole.status_code == 200, whole.text
    body = whole.json()
    text = body["choices"][0]["message"]["content"]
    assert text.strip() and body["usage"]["completion_tokens"] > 0
    with httpx.stream("POST", f"{mesh.url}/v1/chat/completions", headers=mesh.auth, timeout=60,
                      json={"model": mesh.model, "messages": [{"role": "user", "content": "Name three colors."}],
                            "max_tokens": 24, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c.get("choices"))
    assert streamed == text
    assert events[-2]["usage"] == body["usage"]


def test_completion_and_openai_client(mesh):
    import openai

    client = openai.OpenAI(base_url=f"{mesh.url}/v1", api_key=mesh.key, max_retries=0, timeout=60)
    c = client.completions.create(model=mesh.model, prompt=COUNTING, max_tokens=12, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 12 and c.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=mesh.model, prompt=COUNTING, max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    cc = client.chat.completions.create(model=mesh.model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=10, seed=3, temperature=0.8)
    assert cc.choices[0].message.role == "assistant" and cc.choices[0].message.content
    stream = client.chat.completions.create(model=mesh.model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=10,
                                            seed=3, temperature=0.8, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == cc.choices[0].message.content
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "auto" in ids  # task-level routing's alias is always listed
    assert [i for i in ids if i != "auto" and not i.startswith("auto:")] == [mesh.model]


def test_errors_have_openai_shape(mesh):
    r = httpx.post(f"{mesh.url}/v1/chat/completions", headers=mesh.auth, timeout=10,
                   json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{mesh.url}/v1/chat/completions", headers={"Authorization": "Bearer wrong"}, timeout=10,
                   json={"model": mesh.model, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and "message" in r.json()["error"]
    r = httpx.post(f"{mesh.url}/v1/chat/completions", headers={**mesh.auth, "Content-Type": "application/json"},
                   content=b'{"model": "x", "messages": [', timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{mesh.url}/v1/chat/completions", headers={**mesh.auth, "Content-Type": "application/json"},
                   content=b'{"model": "' + b"x" * 3_000_000 + b'"}', timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(f"{mesh.url}/v1/chat/completions", headers=mesh.auth, timeout=10,
                   json={"model": mesh.model, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_rate_limited_key_gets_429(mesh):
    headers = {"Authorization": f"Bearer {mesh.slow_key}"}
    body = {"model": mesh.model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    codes = [httpx.post(f"{mesh.url}/v1/chat/completions", json=body, headers=headers, timeout=60) for _ in range(3)]
    assert [c.status_code for c in codes] == [200, 200, 429]
    assert float(codes[2].headers["Retry-After"]) > 0 and codes[2].json()["error"]["code"]


def test_nodes_view_shows_pseudonyms_never_addresses(mesh):
    r = httpx.get(f"{mesh.url}/v1/mesh/nodes", headers=mesh.auth, timeout=10)
    assert r.status_code == 200
    text = r.text
    data = r.json()["data"] if isinstance(r.json(), dict) else r.json()
    assert len(data) == 2
    assert [n["connection"] for n in data] == ["direct", "direct"]  # the entry's own connections, on loopback
    for node in mesh.nodes:
        assert node.peer_id not in text
        for addr in node.addrs:
            assert addr.split("/p2p/")[0] not in text
    assert "/ip4/" not in text and "12D3Koo" not in text


def _node_status(node) -> dict | None:
    """The node's live status over its control socket, in-process (a `mesh node status`
    subprocess takes a second to start: long enough for a short generation to end)."""
    from node.config import NodeConfig
    from node.control import ControlError, call

    if node.proc.poll() is not None:
        return None
    try:
        return call(NodeConfig(state_dir=node.state_dir).control_socket(), {"cmd": "status"}, timeout=5)
    except ControlError:
        return None


def _tokens_served(mesh) -> dict:
    return {id(n): (s or {}).get("tokens_served", 0) for n in mesh.nodes for s in [_node_status(n)]}


def _serving_node(mesh, before: dict):
    """The node that served the request in flight: its tokens_served grew since `before`.
    The counter only grows, so this does not depend on the generation still running."""
    for node in mesh.nodes:
        s = _node_status(node)
        if s is not None and s["tokens_served"] > before.get(id(node), 0):
            return node
    return None


def _stream_completion(mesh, max_tokens: int, on_first=None) -> tuple[str, list]:
    body = {"model": mesh.model, "prompt": COUNTING, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, events = "", []
    with httpx.stream("POST", f"{mesh.url}/v1/completions", json=body, headers=mesh.auth, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            ev = json.loads(line[6:])
            events.append(ev)
            if ev.get("choices"):
                text += ev["choices"][0]["text"]
                if on_first is not None and text:
                    on_first()
                    on_first = None
    return text, events


def test_graceful_stop_finishes_in_flight_and_leaves_routing(mesh):
    node3 = mesh.add_node("node3")
    wait_nodes(mesh.url, 3, mesh.key)
    expected, _ = _stream_completion(mesh, 60)
    stopped = []

    before = _tokens_served(mesh)

    def stop_serving_node():
        node = _serving_node(mesh, before)
        assert node is not None
        subprocess.run(mesh_cmd("node", "stop", "--state-dir", str(node.state_dir)), check=True, timeout=10, capture_output=True)
        stopped.append(node)

    text, events = _stream_completion(mesh, 60, on_first=stop_serving_node)
    assert text == expected
    assert events[-1]["mesh"]["failovers"] == 0  # it finished on the node that was stopping
    deadline = time.monotonic() + 30
    while stopped[0].proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stopped[0].proc.returncode == 0
    mesh.nodes.remove(stopped[0])
    wait_nodes(mesh.url, 2, mesh.key, limit=10)  # gone from routing within seconds
    assert node3 is not None


def test_kill_9_mid_stream_fails_over_seamlessly(mesh):
    """Last in the module: it kills a node."""
    expected, _ = _stream_completion(mesh, 120)
    killed = []
    before = _tokens_served(mesh)

    def kill_serving_node():
        node = _serving_node(mesh, before)
        assert node is not None
        node.signal(signal.SIGKILL)
        killed.append(node)

    text, events = _stream_completion(mesh, 120, on_first=kill_serving_node)
    assert killed
    assert text == expected  # one uninterrupted, duplicate-free stream
    final = events[-1]
    assert final["usage"]["completion_tokens"] == 120
    assert final["mesh"]["failovers"] == 1 and len(final["mesh"]["served_by"]) == 2


def test_web_chat_in_a_real_browser_gets_a_streamed_answer_from_a_real_node(mesh, tmp_path):
    """Selenium drives Debian's Chromium (chromedriver from apt; nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.support.browser import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromium-driver must be installed (scripts/setup.sh installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(mesh.url + "/")
        wait = WebDriverWait(driver, 60)
        # A keyed entry: the page asks for the key in its settings.
        wait.until(EC.visibility_of_element_located((By.ID, "api-key")))
        driver.find_element(By.ID, "api-key").send_keys(mesh.key)
        driver.find_element(By.ID, "save-key").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        assert mesh.model in driver.find_element(By.CSS_SELECTOR, "#model option").text
        prompt = driver.find_element(By.ID, "prompt")
        prompt.send_keys("What is the capital of France?")
        prompt.send_keys(Keys.ENTER)
        # While streaming the Stop button shows; when done, a meta line names the node kind.
        meta = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant:not(.streaming) .meta"))[0].text
        answer = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .text").text
        assert answer.strip(), "the assistant's answer is empty"
        assert "tokens" in meta and "Q4_1" in meta
        assert driver.find_element(By.ID, "error").get_attribute("hidden") is not None
        driver.save_screenshot(str(tmp_path / "webchat.png"))
    finally:
        driver.quit()
