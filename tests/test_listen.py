"""`steer listen` as people use it: the real page served on a free 127.0.0.1 port, driven in
Debian's headless Chromium, espeak-ng rendering real WAV files, answers in a real SQLite file.
Bad input gets its own status and message and loses nothing already answered."""

import csv
import hashlib
import http.client
import io
import json
import re
import shutil
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from listen.answers import AnswerStore
from listen.app import RATER_COOKIE, create_app
from listen.pairs import read_pairs
from listen.voice import Voice
from steer_cli import steer
from steering.binomial import wilson
from steering.questions import question

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PAIRS = [
    {"id": "calm-steer-01-1", "concept": "calm", "mode": "steer", "turn": "I'm scared about the spelling test.",
     "steered": "That's okay. Let's take one slow breath together.", "plain": "Spelling tests can be hard! Study."},
    {"id": "calm-steer-02-1", "concept": "calm", "mode": "steer", "turn": "My tower fell down!",
     "steered": "Oh, it fell. We can build it again, slowly.", "plain": "Towers fall sometimes. Build another!"},
    {"id": "happy-prompt-01-1", "concept": "happy", "mode": "prompt", "turn": "We got a puppy!",
     "steered": "A puppy! That is wonderful, hooray!", "plain": "A puppy. What is its name?", "judge": "ignored"},
]
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required")


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "perceive.json"
    path.write_text(json.dumps({"model": "smollm2-135m-instruct", "judge": {"x": 1}, "pairs": PAIRS}))
    return path


@contextmanager
def serving(pairs_file: Path, db: Path, voice: Voice) -> Iterator[str]:
    """The real app on a free port in a thread of this process; yields its base URL."""
    server = make_server("127.0.0.1", 0, create_app(read_pairs(pairs_file), AnswerStore(db), voice), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def request(base: str, method: str, path: str, form: dict[str, str] | None = None,
            rater: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request, redirects not followed: (status, headers, body)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {"Cookie": f"{RATER_COOKIE}={rater}"} if rater else {}
    body = urllib.parse.urlencode(form) if form is not None else None
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def present(base: str, pair_id: str, rater: str = "tester") -> tuple[str, str]:
    """Show a pair as a rater would: (its one-time token, the page's HTML)."""
    status, _, body = request(base, "GET", f"/rate/{pair_id}", rater=rater)
    assert status == 200, body
    page = body.decode()
    token = re.search(r'name="token" value="([^"]+)"', page)
    assert token, page
    return token.group(1), page


def answer(base: str, pair_id: str, token: str, value: str) -> tuple[int, str]:
    status, _, body = request(base, "POST", "/answer", {"pair_id": pair_id, "token": token, "answer": value})
    return status, body.decode()


def rows(db: Path) -> list[dict]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM answers ORDER BY rowid")]


def expected_groups(answered: list[dict]) -> dict[tuple[str, str], dict]:
    groups: dict[tuple[str, str], dict] = {}
    for row in answered:
        g = groups.setdefault((row["concept"], row["mode"]), {"steered": 0, "plain": 0, "cant_tell": 0})
        g[row["verdict"]] += 1
    return groups


def need(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install -y chromium chromium-driver espeak-ng; "
                    "`make tools` does it as root): the listening-page test is skipped")


# the page in a real browser ------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    need(CHROMIUM, CHROMEDRIVER, "espeak-ng")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    driver.implicitly_wait(10)  # find_element waits for the next page to arrive
    try:
        yield driver
    finally:
        driver.quit()


PLAY = """
const done = arguments[arguments.length - 1];
const audio = document.getElementById(arguments[0]);
audio.play().then(() => { audio.pause(); done({played: true, duration: audio.duration}); })
            .catch(err => done({played: false, error: String(err)}));
"""


def click_and_wait(browser, element_id: str) -> None:
    """Click a submit button and wait until its page has been replaced by the next one."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.ID, element_id).click()

    def replaced(_driver) -> bool:
        # Mid-navigation Chromium may answer "Node with given id does not belong to the
        # document" (an unknown error, not a stale-element one): the old page is gone there too.
        try:
            page.is_enabled()
        except WebDriverException:
            return True
        return False

    WebDriverWait(browser, 20).until(replaced)


def test_a_listener_rates_pairs_in_the_browser_and_the_figures_agree(browser, pairs_file: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    db = tmp_path / "answers.sqlite"
    voice = Voice(tmp_path / "voice")
    by_id = {p["id"]: p for p in PAIRS}
    with serving(pairs_file, db, voice) as base:
        browser.get(base + "/")
        browser.find_element(By.ID, "rater").send_keys("Rater 7")
        click_and_wait(browser, "start")

        shown: dict[str, tuple[str, dict[str, str]]] = {}  # token -> (pair id, text per side)
        for i, choice in enumerate(("A", "B", "cant_tell")):
            assert browser.find_element(By.ID, "rater-name").text == "Rater 7"
            pair_id = browser.find_element(By.NAME, "pair_id").get_attribute("value")
            token = browser.find_element(By.NAME, "token").get_attribute("value")
            pair = by_id[pair_id]
            assert browser.find_element(By.ID, "question").text == question(pair["concept"])
            assert browser.find_element(By.ID, "turn").text == pair["turn"]
            texts = {side: browser.find_element(By.ID, f"text-{side}").text for side in "AB"}
            assert sorted(texts.values()) == sorted([pair["steered"], pair["plain"]])
            assert browser.execute_script("return document.getElementById('voice-missing')") is None  # no implicit wait
            if i == 0:  # the voice: real WAV bytes, and the browser plays them
                for side in "AB":
                    src = browser.find_element(By.ID, f"audio-{side}").get_attribute("src")
                    status, headers, wav = request(base, "GET", urllib.parse.urlsplit(src).path)
                    assert status == 200 and headers["Content-Type"] == "audio/wav"
                    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE" and len(wav) > 1000
                    played = browser.execute_async_script(PLAY, f"audio-{side}")
                    assert played["played"] and played["duration"] > 0, played
            shown[token] = (pair_id, texts)
            click_and_wait(browser, f"answer-{choice}")
        assert browser.find_element(By.ID, "done").text == "Thank you, Rater 7!"

        answered = rows(db)
        assert [r["answer"] for r in answered] == ["A", "B", "cant_tell"]
        for row in answered:
            pair_id, texts = shown[row["token"]]
            pair = by_id[pair_id]
            assert (row["rater"], row["pair_id"], row["concept"], row["mode"]) == ("Rater 7", pair_id, pair["concept"], pair["mode"])
            assert texts[row["steered_side"]] == pair["steered"]  # the side stored is the side the page showed
            want = "cant_tell" if row["answer"] == "cant_tell" else ("steered" if row["answer"] == row["steered_side"] else "plain")
            assert row["verdict"] == want
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", row["answered_utc"])
        groups = expected_groups(answered)

        status, _, body = request(base, "GET", "/results.json")
        figures = {(g["concept"], g["mode"]): g for g in json.loads(body)["groups"]}
        assert status == 200 and figures.keys() == groups.keys()
        status, headers, body = request(base, "GET", "/results.csv")
        table = {(r["concept"], r["mode"]): r for r in csv.DictReader(io.StringIO(body.decode()))}
        assert status == 200 and headers["Content-Type"].startswith("text/csv") and table.keys() == groups.keys()
        browser.get(base + "/results")
        for key, want in groups.items():
            decided = want["steered"] + want["plain"]
            win = want["steered"] / decided if decided else None
            got = figures[key]
            assert (got["answers"], got["steered"], got["plain"], got["cant_tell"], got["decided"]) == (
                sum(want.values()), want["steered"], want["plain"], want["cant_tell"], decided)
            assert got["win_rate"] == win and got["cant_tell_share"] == want["cant_tell"] / sum(want.values())
            assert (got["wilson_low"], got["wilson_high"]) == (wilson(want["steered"], decided) if decided else (None, None))
            assert int(table[key]["answers"]) == got["answers"] and int(table[key]["steered"]) == want["steered"]
            assert table[key]["win_rate"] == ("" if win is None else f"{win:.6f}")
            row = browser.find_element(By.CSS_SELECTOR, f'tr[data-concept="{key[0]}"][data-mode="{key[1]}"]')
            assert row.find_element(By.CLASS_NAME, "answers").text == str(got["answers"])
            assert row.find_element(By.CLASS_NAME, "win-rate").text == ("–" if win is None else f"{win:.3f}")
        plot = browser.find_element(By.ID, "plot")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot) > 0
        status, headers, png = request(base, "GET", "/results.png")
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"


# bad input: its own status and message, nothing lost -------------------------------------------


def test_bad_input_gets_its_status_and_loses_nothing(pairs_file: Path, tmp_path: Path) -> None:
    db = tmp_path / "answers.sqlite"
    first, second = PAIRS[0]["id"], PAIRS[1]["id"]
    # the voice is beside the point here; a missing one must not matter
    with serving(pairs_file, db, Voice(tmp_path / "voice", command=str(tmp_path / "no-espeak"))) as base:

        def still_works() -> None:
            """A good answer after a bad request: it is stored, and every earlier row is unchanged."""
            before = rows(db)
            token, _ = present(base, second)
            assert answer(base, second, token, "cant_tell")[0] == 303
            after = rows(db)
            assert after[:-1] == before and (after[-1]["token"], after[-1]["answer"]) == (token, "cant_tell")

        status, _, body = request(base, "GET", "/rate/no-such-pair", rater="tester")
        assert status == 404 and b"no pair with id &#39;no-such-pair&#39;" in body
        still_works()
        token, _ = present(base, first)
        status, body = answer(base, "no-such-pair", token, "A")
        assert status == 404 and "no pair with id" in body
        still_works()
        status, body = answer(base, first, token, "maybe")
        assert status == 400 and "answer &#39;maybe&#39; is not one of A, B, cant_tell" in body
        still_works()
        status, body = answer(base, first, "forged-token", "A")
        assert status == 404 and "no such presentation" in body
        still_works()
        status, body = answer(base, second, token, "A")
        assert status == 400 and "this presentation shows pair" in body
        still_works()
        assert {r["pair_id"] for r in rows(db)} == {second}  # nothing of the bad requests was written

        status, body = answer(base, first, token, "A")  # the token was not used up by the bad requests
        assert status == 303, body
        kept = rows(db)
        assert (kept[-1]["token"], kept[-1]["pair_id"], kept[-1]["answer"]) == (token, first, "A")

        status, body = answer(base, first, token, "B")  # replayed: refused, the first answer stands
        assert status == 409 and "already answered" in body and "first answer stands" in body
        assert rows(db) == kept
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        still_works()

        status, _, body = request(base, "POST", "/rater", {"rater": "   "})
        assert status == 400 and b"enter a name or code" in body
        still_works()
        status, _, body = request(base, "GET", "/results.json")
        assert status == 200 and json.loads(body)["answers"] == len(rows(db)) == 8  # seven good answers and the first


@pytest.mark.parametrize("command, says", [("no-such-espeak", "is not installed"), ("/bin/false", "failed")])
def test_a_missing_voice_shows_the_text_and_says_so(pairs_file: Path, tmp_path: Path, command: str, says: str) -> None:
    db = tmp_path / "answers.sqlite"
    voice = Voice(tmp_path / "voice", command=command if command.startswith("/") else str(tmp_path / command))
    pair = PAIRS[0]
    with serving(pairs_file, db, voice) as base:
        token, page = present(base, pair["id"])
        assert 'id="voice-missing"' in page and "the voice is missing" in page and says in page
        assert "<audio" not in page
        assert pair["turn"].replace("'", "&#39;") in page and pair["steered"].replace("'", "&#39;") in page
        status, _, body = request(base, "GET", f"/audio/{token}/A")
        assert status == 503 and b"the voice is missing" in body and says.encode() in body
        assert answer(base, pair["id"], token, "B")[0] == 303  # rating by reading still works
        assert [r["answer"] for r in rows(db)] == ["B"]
    cache = tmp_path / "voice"
    assert not (cache.exists() and any(cache.iterdir()))  # no half-written WAV left behind


def test_the_voice_renders_once_per_voice_and_text(tmp_path: Path) -> None:
    need("espeak-ng")
    voice = Voice(tmp_path / "voice")
    text = "Let's take one slow breath; \"together\" -- okay? $(touch pwned)"
    path = voice.render(text)
    assert path.name == hashlib.sha256(f"en-us\0{text}".encode()).hexdigest() + ".wav"
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    mtime = path.stat().st_mtime_ns
    assert voice.render(text) == path and path.stat().st_mtime_ns == mtime  # cached, not rendered again
    assert Voice(tmp_path / "voice", voice="en-gb").render(text) != path
    assert [p.name for p in (tmp_path / "voice").iterdir() if p.name.startswith(".")] == []  # no temp files
    assert not Path("pwned").exists()


# the figures and the command line ------------------------------------------------------------


def test_wilson_interval() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    low, high = wilson(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson(10, 10)
    assert round(high, 9) == 1.0 and round(low, 4) == 0.7225 and low > 0.5  # ten of ten: listeners could tell


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "is not readable JSON"),
    ('{"pairs": []}', 'has no "pairs" list, or it is empty'),
    ('{"pairs": [{"id": "x", "concept": "calm", "mode": "loud", "turn": "t", "steered": "s", "plain": "p"}]}',
     "mode 'loud' is not one of steer, prompt, both"),
    ('{"pairs": [{"id": "x", "concept": "calm", "mode": "steer", "turn": "t", "steered": "s"}]}',
     "'plain' must be a non-empty string"),
])
def test_a_bad_pairs_file_is_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "perceive.json"
    if content is not None:
        path.write_text(content)
    res = steer("listen", "--pairs", str(path), "--db", str(tmp_path / "a.sqlite"), "--port", "0")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("steer: error: pairs file") and message in lines[0], res.stderr
