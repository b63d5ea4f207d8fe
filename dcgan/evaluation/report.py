"""An evaluation's report as a person reads it (layer: dcgan): Markdown and HTML pages with the suites' figures
and pictures, and the run's index page that lists every evaluated checkpoint, newest first."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from dcgan.evaluation.suites import Section



def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def render_markdown(title: str, header: list[str], sections: list[Section]) -> str:
    lines = [f"# {title}", "", *[f"- {h}" for h in header], ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.status != "ok":
            lines += [f"**{s.status}**", ""]
            continue
        lines += [*s.text, ""] if s.text else []
        if s.metrics:
            lines += ["| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in s.metrics.items()]
            lines.append("")
        for name, caption in s.images:
            lines += [f"![{caption}]({name})", f"*{caption}*", ""]
    return "\n".join(lines)


def render_html(title: str, header: list[str], sections: list[Section]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>", "<ul>" + "".join(f"<li>{e(h)}</li>" for h in header) + "</ul>"]
    for s in sections:
        body.append(f"<h2>{e(s.title)}</h2>")
        if s.status != "ok":
            body.append(f"<p><strong>{e(s.status)}</strong></p>")
            continue
        body += [f"<p>{e(t)}</p>" for t in s.text]
        if s.metrics:
            rows = "".join(f"<tr><td>{e(str(k))}</td><td>{e(_fmt(v))}</td></tr>" for k, v in s.metrics.items())
            body.append(f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>")
        for name, caption in s.images:
            body.append(f'<figure><img src="{e(name)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:60em;margin:auto}img{image-rendering:pixelated;max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _headline(suites: dict[str, dict]) -> str:
    """The numbers of one evaluation that fit in a table cell (floats and ints of the suites that ran)."""
    parts = []
    for name, s in suites.items():
        if s.get("status") != "ok":
            continue
        for k, v in s.items():
            if k not in ("status", "seconds", "n", "seed") and isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{name}.{k} {_fmt(v)}")
    return "; ".join(parts[:8]) or "-"


def render_history(title: str, run_uri: str, history: list[dict]) -> tuple[str, str]:
    """The run's evaluation index (Markdown, HTML): one row per evaluation, newest first, linking its report."""
    rows = sorted(history, key=lambda h: (h["step"], h["evaluated_at"]), reverse=True)
    md = [f"# {title}", "", f"- run: {run_uri}", f"- {len(rows)} evaluation(s); newest first", "",
          "| step | report | evaluated | suites | figures |", "| --- | --- | --- | --- | --- |"]
    cells = []
    for h in rows:
        folder = f"step-{h['step']:07d}"
        ran = ", ".join(k for k, s in h["suites"].items() if s.get("status") == "ok")
        md.append(f"| {h['step']} | [{folder}/report.md]({folder}/report.md) | {h['evaluated_at']} | {ran} | "
                  f"{_headline(h['suites'])} |")
        cells.append((h["step"], folder, h["evaluated_at"], ran, _headline(h["suites"])))
    e = html.escape
    body = "".join(f"<tr><td>{s}</td><td><a href='{f}/report.html'>{f}</a></td><td>{e(t)}</td><td>{e(r)}</td>"
                   f"<td>{e(x)}</td></tr>" for s, f, t, r, x in cells)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title></head><body>"
            f"<h1>{e(title)}</h1><p>run: {e(run_uri)}</p><table border='1' cellpadding='4'><tr><th>step</th>"
            f"<th>report</th><th>evaluated</th><th>suites</th><th>figures</th></tr>{body}</table></body></html>\n")
    return "\n".join(md) + "\n", page
