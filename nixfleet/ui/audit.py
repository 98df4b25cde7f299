"""The audit log page, with filters and a spreadsheet-safe CSV export."""

from __future__ import annotations

from dataclasses import asdict

import falcon

from nixfleet.cli.audit import to_csv
from nixfleet.errors import FieldError, ValidationError
from nixfleet.store import audit
from nixfleet.ui.web import Page, Viewer

PAGE = 200
EXPORT_MAX = 10_000
FILTER_MAX = 256
FILTERS = ("actor", "action", "target")


def _filters(req: falcon.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in FILTERS:
        value = (req.get_param(name) or "").strip()
        if len(value) > FILTER_MAX or "\x00" in value:
            raise ValidationError(
                f"invalid {name} filter",
                errors=[FieldError(name, f"at most {FILTER_MAX} characters, no NUL")],
            )
        out[name] = value
    return out


class AuditPage(Page):
    def get(self, req: falcon.Request, resp: falcon.Response, viewer: Viewer) -> None:
        f = _filters(req)
        export = req.get_param("format") == "csv"
        with self.ui.ctx.store.read() as conn:
            entries = audit.query(
                conn,
                f["actor"] or None,
                f["action"] or None,
                f["target"] or None,
                EXPORT_MAX if export else PAGE,
            )
        if export:
            resp.content_type = "text/csv; charset=utf-8"
            resp.set_header("Content-Disposition", 'attachment; filename="nixfleet-audit.csv"')
            resp.set_header("Cache-Control", "no-store")
            resp.text = to_csv([asdict(e) for e in entries])
            return
        self.ui.render(
            resp,
            "audit.html",
            viewer=viewer,
            entries=entries,
            filters=f,
            limit=PAGE,
            nav="audit",
        )
