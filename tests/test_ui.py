"""The dashboard in a real browser (Debian's chromium, headless, driven by Playwright) against the whole stack:
sign in, upload a bad file and read its report, submit from the form, watch the curves grow live, cancel and
retry, download a checkpoint file, and find another tenant's job answering 404. Screenshots of the main pages go
to runs/screenshots/ (git ignores runs/)."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import CHROMIUM, SHOTS
from tests.services import make_key

BAD = b'{"prompt": "Q", "chosen": "A", "rejected": "B"}\n{"prompt": "Q", "chosen": 3}\nnot json\n'
STEPS = 100  # the job cancelled while it runs, then retried to the end

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (scripts/setup.sh)")


@pytest.fixture(scope="module")
def keys(stack):
    url = stack.env["PREFQ_DATABASE_URL"]
    return {"alpha": make_key(url, "ui-alpha"), "beta": make_key(url, "ui-beta"), "admin": stack.env["PREFQ_API_KEY"]}


class Watched:
    """A browser context whose pages' console errors and uncaught exceptions are kept."""

    def __init__(self, browser, base_url: str, **options):
        self.context = browser.new_context(base_url=base_url, **options)
        self.errors: list[str] = []

    def page(self):
        page = self.context.new_page()
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"{page.url}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))
        return page


def sign_in(page, key: str, target: str = "/ui/jobs") -> None:
    """From the keyboard: the key field has the focus, Enter submits."""
    page.goto(target)
    assert "/ui/login" in page.url
    # autofocus lands at a rendering step that may come after `load`: keys typed before it would be lost
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'key'", timeout=10_000)
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(re.escape(target) + "$"))


def points(page, chart: str) -> int:
    return int(page.get_attribute(f"#chart-{chart}", "data-points") or 0)


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_the_dashboard_in_a_browser(stack, browser, keys, micro_model, toy_dpo):
    alpha = Watched(browser, stack.url, viewport={"width": 1280, "height": 900})
    page = alpha.page()
    page.goto("/ui/jobs")
    shot(page, "01-sign-in")
    sign_in(page, keys["alpha"])
    cookie = next(c for c in alpha.context.cookies() if c["name"] == "prefq_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and keys["alpha"] not in cookie["value"]

    # a malformed upload: its line-level report, and nothing stored
    page.goto("/ui/new")
    page.set_input_files("#file", files=[{"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": BAD}])
    page.click("#upload")
    page.wait_for_selector("#problems")
    report = page.inner_text("#problems")
    assert "2\tchosen\texpected a string" in report and "3\t-\tmalformed JSON" in report, report
    assert "nothing was stored" in page.inner_text("#upload-report")
    shot(page, "02-upload-report")
    assert stack.http.get("/datasets", params={"tenant": "ui-alpha"}).json()["data"] == []

    # a good one, then the job from the form
    page.set_input_files("#file", str(toy_dpo))
    page.click("#upload")
    dataset_id = page.inner_text("#new-dataset", timeout=30_000)
    assert page.input_value("#dataset") == dataset_id
    page.fill("#model", str(micro_model))
    page.fill("#metadata", "run=ui-test")
    hyper = {
        "max_steps": str(STEPS),
        "batch_size": "16",
        "learning_rate": "3e-3",
        "max_length": "64",
        "save_steps": "10",
        "eval_steps": "10",
    }
    for name, value in hyper.items():
        page.fill(f"#hp-{name}", value)
    page.select_option("#hp-lr_scheduler", "constant")
    assert page.get_attribute("#hp-beta", "placeholder") == "0.1", "the spec's defaults are shown"
    shot(page, "03-new-job")
    page.click("#submit")
    page.wait_for_url(re.compile(r"/ui/jobs/job_\w+$"))
    job_id = page.url.rsplit("/", 1)[1]
    job = stack.get(f"/jobs/{job_id}")
    assert job["tenant"] == "ui-alpha" and job["hyperparameters"]["max_steps"] == STEPS
    assert job["metadata"] == {"run": "ui-test"} and job["dataset_id"] == dataset_id

    # the jobs list, in another tab, follows the status without a reload
    listing = alpha.page()
    listing.goto("/ui/jobs?q=ui-test")
    assert listing.locator(f"#row-{job_id}").count() == 1

    # live: progress and the loss curve advance on the open page
    page.wait_for_function("() => +document.querySelector('#chart-loss')?.dataset.points >= 3", timeout=180_000)
    before, bar = points(page, "loss"), float(page.get_attribute("#progress", "value"))
    page.wait_for_function(
        f"() => +document.querySelector('#chart-loss').dataset.points > {before + 2}", timeout=60_000
    )
    # the bar follows `progress` events, the curve `eval` ones too: the bar may come a moment after the curve
    page.wait_for_function(f"() => +document.querySelector('#progress').value > {bar}", timeout=60_000)
    assert points(page, "accuracy") > 0 and points(page, "lr") > 0
    assert page.locator("#events tr.ev-progress").count() >= before
    page.wait_for_selector(".ckpt-file", state="attached", timeout=60_000)

    # cancel it while it runs, as soon as it has a checkpoint to resume from (a fast processor runs the
    # remaining steps in seconds); the page and the list follow; then retry it
    page.focus("#cancel")  # from the keyboard
    page.keyboard.press("Enter")
    page.wait_for_selector("#panel[data-status='cancelled'], #panel[data-status='succeeded']", timeout=90_000)
    assert page.get_attribute("#panel", "data-status") == "cancelled", "still running when cancelled"
    assert 10 <= points(page, "loss") < STEPS
    # the samples section follows the evaluations too: step 10's samples came after the page opened
    page.wait_for_function(
        "() => [...document.querySelectorAll('#samples details.sample tbody tr td:first-child')]"
        ".some(td => td.textContent.trim() === '10')",
        timeout=60_000,
    )
    listing.bring_to_front()
    listing.wait_for_selector(f"#row-{job_id} .s-cancelled", timeout=15_000)
    page.bring_to_front()
    assert page.locator("#events tr.ev-cancelled").count() == 1
    shot(page, "05-job-cancelled")
    page.click("#retry")
    page.wait_for_selector("#panel[data-status='queued'], #panel[data-status='running']", timeout=30_000)
    page.wait_for_selector("#events tr.ev-retried", state="attached", timeout=30_000)
    assert stack.get(f"/jobs/{job_id}")["attempt"] == 2

    # a checkpoint's file downloads (through a presigned S3 URL); the retried attempt resumes and succeeds
    href = page.get_attribute(".ckpt-file", "href")
    answer = page.request.get(href)
    assert answer.status == 200 and answer.body(), href
    page.wait_for_selector("#panel[data-status='succeeded']", timeout=180_000)
    events = stack.get(f"/jobs/{job_id}/events")["data"]
    resumed = next(e for e in events if e["type"] == "started" and e["attempt"] == 2)["data"]
    assert resumed["resumed_from_step"] >= 10, "the retry resumes from a checkpoint"
    # the status comes with the job's state, the row with the events' stream: either may come first
    page.wait_for_selector("#events tr.ev-succeeded", state="attached", timeout=30_000)
    assert page.locator("#events tr.ev-succeeded").count() == 1
    model_file = page.get_attribute("#model-files a[href$='/config.json']", "href")
    assert page.request.get(model_file).status == 200
    assert float(page.get_attribute("#progress", "value")) == STEPS
    shot(page, "06-job-succeeded")

    # a second, shorter job of alpha's (through the API), then both ticked in the list and compared
    second = httpx.post(
        f"{stack.url}/jobs",
        headers={"Authorization": f"Bearer {keys['alpha']}"},
        json={
            "model": str(micro_model),
            "dataset": dataset_id,
            "method": "dpo",
            "metadata": {"run": "ui-second"},
            "hyperparameters": {
                **{k: float(v) if "e-" in v else int(v) for k, v in hyper.items()},
                "max_steps": 20,
                "beta": 0.3,
            },
        },
    ).json()["id"]
    stack.wait_for(second, {"succeeded"}, timeout_s=180)
    page.goto("/ui/jobs")
    shot(page, "07-jobs")
    page.check(f"#sel-{job_id}")
    page.check(f"#sel-{second}")
    page.click("text=Compare selected")
    page.wait_for_url(re.compile(r"/ui/compare\?"))
    page.wait_for_function(f"() => +document.querySelector('#chart-loss')?.dataset.points >= {STEPS + 20}")
    assert job_id in page.inner_text("ul.legend") and second in page.inner_text("ul.legend")
    shot(page, "08-compare")
    page.goto("/ui/new")
    assert page.locator(f"#models option[value='{micro_model}']").count() == 1, "recent models suggested"
    page.goto("/ui/datasets")
    assert dataset_id in page.inner_text("table.datasets")
    shot(page, "09-datasets")
    page.set_viewport_size({"width": 380, "height": 800})
    page.goto(f"/ui/jobs/{job_id}")
    page.wait_for_function("() => +document.querySelector('#chart-loss')?.dataset.points > 0")
    wide = page.evaluate(
        """() => [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 1 && !e.closest('.scroll')).map(e => e.tagName + '#' + e.id + '.' + e.className).slice(0, 12)"""
    )
    assert wide == [], f"no sideways scrolling: {wide}"
    shot(page, "10-job-narrow")

    # another tenant: the same URL answers as a job that does not exist
    beta = Watched(browser, stack.url)
    other = beta.page()
    sign_in(other, keys["beta"])
    assert job_id not in other.inner_text("#job-rows")
    assert other.goto(f"/ui/jobs/{job_id}").status == 404
    assert other.request.get(f"/ui/jobs/{job_id}/stream").status == 404
    assert other.request.get(href).status == 404
    shot(other, "11-other-tenant-404")

    # the admin's workers page
    admin = Watched(browser, stack.url)
    ops = admin.page()
    sign_in(ops, keys["admin"], "/ui/workers")
    assert "prefq-test-worker@" in ops.inner_text("table.workers")
    shot(ops, "12-workers")

    # sign-out ends the session
    page.click("text=Sign out")
    page.wait_for_url(re.compile(r"/ui/login"))
    page.goto(f"/ui/jobs/{job_id}")
    assert "/ui/login" in page.url

    assert alpha.errors == [] and admin.errors == [], alpha.errors + admin.errors
    assert all("404" in e for e in beta.errors), beta.errors
    for ctx in (alpha, beta, admin):
        ctx.context.close()


def test_samples_step_by_step_and_the_registry_in_a_browser(stack, browser, keys, dpo_job):
    """A job's page shows its samples step by step (conftest's `dpo_job`, the default tenant's: 3 prompts at steps 0,
    8 and 16; samples arriving live: `test_the_dashboard_in_a_browser`); its model is promoted from the page and the
    registry's pages list it; another tenant's model page answers 404."""
    job_id = dpo_job.job["id"]
    alpha = Watched(browser, stack.url, viewport={"width": 1280, "height": 900})
    page = alpha.page()
    sign_in(page, keys["admin"], f"/ui/jobs/{job_id}")
    # step 0 (policy and reference), 8, 16 for each of the three prompts
    page.wait_for_function(
        "() => document.querySelectorAll('#samples details.sample').length === 3 && "
        "document.querySelectorAll('#samples details.sample')[0].querySelectorAll('tbody tr').length"
        " === 4",
        timeout=60_000,
    )
    page.wait_for_selector("#panel[data-status='succeeded']", timeout=60_000)
    rows = page.locator("#samples details.sample").first.locator("tbody tr")
    cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(4)]
    assert [(c[0], c[1]) for c in cells] == [("0", "policy"), ("0", "reference"), ("8", "policy"), ("16", "policy")]
    assert cells[1][3] == "–" and cells[3][3] != "–", "the reference has no reward, the policy has"
    shot(page, "13-job-samples")

    page.fill("#promote-name", "ui-model")
    page.fill("#promote-alias", "staging")
    page.click("#promote")
    page.wait_for_url(re.compile(r"/ui/models/ui-model$"))
    assert job_id in page.inner_text("#versions") and "staging" in page.inner_text("#versions")
    assert "models:/ui-model/1" in page.inner_text("#versions")
    shot(page, "14-model")
    page.click("nav >> text=Models")
    page.wait_for_url(re.compile(r"/ui/models$"))
    assert "ui-model" in page.inner_text("#models")

    beta = Watched(browser, stack.url)
    other = beta.page()
    sign_in(other, keys["beta"])
    assert other.goto("/ui/models/ui-model").status == 404
    other.goto("/ui/models")
    assert "ui-model" not in other.inner_text("main")
    assert alpha.errors == [], alpha.errors
    assert all("404" in e for e in beta.errors), beta.errors
    for ctx in (alpha, beta):
        ctx.context.close()
