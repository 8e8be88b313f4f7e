"""report.md shows every user-provided string (preset, model, strategy and data set names, notes,
options, the command, error messages) as text: a crafted name cannot become a link, a remote image,
HTML, or break a table, whatever Markdown it holds.

The report is rendered with a real CommonMark parser (markdown-it, GFM tables on) and the HTML it
gives is checked, not the Markdown's look.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest
from markdown_it import MarkdownIt

from sopkit.experiment.records import TRIAL_KEY_TRAIN_FIELDS, TrialRecord
from sopkit.experiment.results import aggregate
from sopkit.report.markdown import md_escape, md_line, render_markdown
from sopkit.report.meta import ReportMeta

LINK = "[x](http://evil.example/a)"
IMAGE = "![i](http://evil.example/a.png)"
HTML = '<img src="http://evil.example/b.png"><script>alert(1)</script>'
CRAFTED = [
    LINK,
    IMAGE,
    HTML,
    "a | b\n| c | d |\n",
    "<http://evil.example/auto>",
    "www.evil.example and someone@evil.example",
    "[ref]: http://evil.example/ref",
    "**bold** _em_ `code` ~~strike~~ $x$",
    "# heading\n> quote\n- item\n1. item",
]


def _trial(strategy: str, seed: int, *, model: str, dataset: str, failure: str | None) -> TrialRecord:
    train = dict.fromkeys(TRIAL_KEY_TRAIN_FIELDS, 1) | {"schedule": "constant", "lr": 0.001}
    spec = {
        "dataset": dataset, "model": model, "optimizer": "adam", "strategy": strategy,
        "seed": seed, "lr": 0.001, "train": train, "expansion": 3,
        "options": {"mk.note": LINK},
    }
    result: dict[str, Any] = {} if failure else {
        "test_accuracy": 0.5 + seed / 100, "val_accuracy": 0.5, "train_params": 10,
        "inference_params": 10, "wall_time": 1.0, "median_step_time": 0.001,
        "curve": [{"epoch": 1, "step": 1, "train_loss": 1.0, "val_accuracy": 0.5,
                   "test_accuracy": 0.5, "seconds": 1.0}],
    }
    provenance = {"git_revision": IMAGE, "python": HTML, "versions": {"torch": LINK}}
    stored_failure = None
    if failure is not None:
        stored_failure = {"error_type": "RuntimeError", "message": failure, "traceback": "tb"}
    return TrialRecord.from_stored(
        f"{strategy}-{seed}", "failed" if failure else "finished", spec, result, provenance,
        float(seed), stored_failure,
    )


def crafted_report() -> str:
    trials = []
    for index, name in enumerate(CRAFTED):
        model, dataset = CRAFTED[(index + 1) % len(CRAFTED)], CRAFTED[(index + 2) % len(CRAFTED)]
        for strategy in ("baseline", name):
            for seed in (0, 1):
                failure = CRAFTED[(index + 3) % len(CRAFTED)] if seed == 1 and strategy == name else None
                trials.append(_trial(strategy, seed, model=model, dataset=dataset, failure=failure))
    groups = aggregate(trials)
    meta = ReportMeta.from_trials(
        trials, title=HTML + " " + LINK, preset=IMAGE, command="sopkit compare --preset '```x'",
        complete=False, grid_note="[ref]: http://evil.example/note\n# not a heading",
    )
    return render_markdown(groups, meta)


class _Tags(HTMLParser):
    """Every tag (with its attributes) in rendered HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def rendered(markdown: str) -> str:
    return MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough").render(
        markdown
    )


def test_crafted_names_render_as_text_not_links_images_or_html() -> None:
    markdown = crafted_report()
    html = rendered(markdown)
    parser = _Tags()
    parser.feed(html)
    tags = {tag for tag, _ in parser.tags}
    # (The report's own markup: headings, tables, bold cells, its warning quotes, the command.)
    assert not tags & {"a", "img", "script", "em", "del"}, tags
    assert "evil.example" not in "".join(str(attrs) for _, attrs in parser.tags)
    assert "<script" not in html
    # GitHub also links bare URLs and addresses: never one left to find in the text.
    assert not re.search(r"(?<!\\)://|(?<![\\a-z])www\.|(?<!\\)@", markdown)
    # The names are all there, as text.
    text = re.sub(r"<[^>]+>", "", html)
    for fragment in ("[x](http://evil.example/a)", "![i](http://evil.example/a.png)",
                     "someone@evil.example", "**bold** _em_", "[ref]: http://evil.example/ref"):
        assert fragment in text.replace("&quot;", '"').replace("&amp;", "&"), fragment


def test_crafted_names_never_break_a_table() -> None:
    html = rendered(crafted_report())
    for table in re.findall(r"<table>.*?</table>", html, flags=re.S):
        header = len(re.findall(r"<th[ >]", table))
        rows = re.findall(r"<tr>(.*?)</tr>", table.split("</thead>", 1)[1], flags=re.S)
        assert rows
        assert all(len(re.findall(r"<td", row)) == header for row in rows)
    # Every heading the report has, and none a name made.
    headings = re.findall(r"<h[1-6]>(.*?)</h[1-6]>", html)
    assert not any(h.startswith(("heading", "not a heading")) for h in headings)


@pytest.mark.parametrize("crafted", CRAFTED)
def test_one_string_escaped_renders_exactly_as_itself(crafted: str) -> None:
    flat = " ".join(crafted.splitlines()).strip()
    # md_escape inside a line (a cell, an item's value); md_line where the text starts the line.
    for markdown, expected in ((f"text: {md_escape(crafted)}", f"text: {flat}"),
                               (md_line(crafted), flat)):
        html = rendered(markdown).strip()
        inner = re.fullmatch(r"<p>(.*)</p>", html, flags=re.S)
        assert inner is not None, html
        shown = inner.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
        assert shown.replace("&amp;", "&") == expected
