"""``semrecon readers serve``: the scoring page of a reader kit (Flask on werkzeug's threaded server).

Each reader has a URL ``http://HOST:PORT/r/<token>/`` whose token is a secret stored in the kit's score database
(the same after a restart). Under it, and nowhere else:

- ``GET /r/<token>/``: the page (``page.html``: one screen at a time, the criteria as 1–5 scales, keyboard
  shortcuts, window/level and zoom, progress);
- ``GET /r/<token>/api/state``: the reader's position, the total and the image ids of the current screen;
- ``POST /r/<token>/api/scores``: the scores of the current screen ``{"position": n, "scores": {id: {criterion:
  1–5}}}``, committed to SQLite before the answer (the next screen's state) is sent;
- ``GET /r/<token>/image/<id>.png``: an image of the kit.

An unknown token gets 403, an id that is not the kit's (or any other path) 404, a stale or foreign screen 409. A
reader only ever writes their own rows and no response carries another reader's scores, a method, a file or a
case name: the key stays on disk. Responses are not cached and send no referrer, so the token does not leave the
page. The server binds the loopback interface unless ``--host`` says otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask, Response

    from semrecon_core.readers.kit import Kit
    from semrecon_core.readers.store import ScoreStore

log = logging.getLogger(__name__)

DATABASE = "scores.sqlite"
SCORES = range(1, 6)


def _flask() -> Any:
    try:
        import flask
    except ImportError:
        raise ImportError("semrecon readers serve needs Flask (pip install 'semrecon[readers]')") from None
    return flask


def reader_position(kit: Kit, store: ScoreStore, reader: str) -> tuple[int, list[list[str]]]:
    """``(position, screens)``: the reader's first screen not fully scored (``len(screens)`` when done)."""
    _, screens = kit.reader_order(reader)
    criteria = {c["key"] for c in kit.criteria}
    scored = store.scored_images(reader)
    for position, screen in enumerate(screens):
        if any(not criteria <= scored.get(image, set()) for image in screen):
            return position, screens
    return len(screens), screens


def create_app(kit: Kit, store: ScoreStore, readers: Sequence[str]) -> Flask:
    """The web app of ``kit`` for ``readers`` (their tokens must be in ``store``)."""
    flask = _flask()
    from werkzeug.exceptions import Forbidden, NotFound

    app = flask.Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    page = resources.files("semrecon_core.readers").joinpath("page.html").read_text(encoding="utf-8")
    criteria_keys = [c["key"] for c in kit.criteria]
    allowed = set(readers)

    def reader_of(token: str) -> str:
        name = store.reader_of(token)
        if name is None or name not in allowed:
            raise Forbidden()
        return name

    def state(reader: str) -> dict[str, Any]:
        position, screens = reader_position(kit, store, reader)
        return {
            "position": position,
            "total": len(screens),
            "finished": position == len(screens),
            "screen": screens[position] if position < len(screens) else [],
            "criteria": list(kit.criteria),
            "layout": kit.layout,
        }

    @app.get("/r/<token>/")
    def show_page(token: str) -> Response:
        reader_of(token)
        return flask.Response(page, mimetype="text/html")

    @app.get("/r/<token>/api/state")
    def get_state(token: str) -> Response:
        return flask.jsonify(state(reader_of(token)))

    @app.post("/r/<token>/api/scores")
    def post_scores(token: str) -> Any:
        reader = reader_of(token)
        body = flask.request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("scores"), dict):
            return flask.jsonify(error='expected {"position": n, "scores": {id: {criterion: 1-5}}}'), 400
        position, screens = reader_position(kit, store, reader)
        if position >= len(screens) or body.get("position") != position:
            return flask.jsonify(error="not the current screen", state=state(reader)), 409
        given: dict[str, Any] = body["scores"]
        if set(given) != set(screens[position]):
            return flask.jsonify(error="scores must name exactly the current screen's images", state=state(reader)), 409
        for values in given.values():
            if not isinstance(values, dict) or set(values) != set(criteria_keys):
                return flask.jsonify(error=f"every image needs the criteria {', '.join(criteria_keys)}"), 400
            if any(type(v) is not int or v not in SCORES for v in values.values()):
                return flask.jsonify(error="scores are integers from 1 to 5"), 400
        store.save(reader, given)  # committed before the next screen is sent
        return flask.jsonify(state(reader))

    @app.get("/r/<token>/image/<image_id>.png")
    def image(token: str, image_id: str) -> Response:
        reader_of(token)
        path = kit.png(image_id)
        if path is None or not path.is_file():
            raise NotFound()
        return flask.Response(path.read_bytes(), mimetype="image/png")

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'"
        )
        return response

    for status in (400, 403, 404, 405, 413):
        app.register_error_handler(status, _plain_error(flask, status))
    return app


def _plain_error(flask: Any, status: int) -> Callable[[Exception], Any]:
    """An error page that says only its status (werkzeug's default pages echo nothing sensitive, but say more)."""
    titles = {400: "bad request", 403: "forbidden", 404: "not found", 405: "method not allowed", 413: "too large"}

    def handler(_: Exception) -> Any:
        return flask.Response(f"{status} {titles[status]}\n", status=status, mimetype="text/plain")

    return handler


def parse_readers(text: str) -> list[str]:
    """``NAME[,NAME...]`` → names (checked: non-empty, unique, printable, at most 64 characters)."""
    names = [n.strip() for n in text.split(",")]
    if not names or any(not n or len(n) > 64 or not n.isprintable() for n in names):
        raise ValueError(f"--readers {text!r}: expected NAME[,NAME...] (printable names of 1–64 characters)")
    if len(set(names)) != len(names):
        raise ValueError(f"--readers {text!r}: names must be unique")
    return names


def serve(
    folder: str | Path,
    readers: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8750,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve the kit in ``folder`` until interrupted; ``announce`` gets one line per reader with the URL."""
    from werkzeug.serving import make_server

    from semrecon_core.readers.kit import load_kit
    from semrecon_core.readers.store import ScoreStore

    kit = load_kit(folder)
    store = ScoreStore(Path(folder) / DATABASE)
    tokens = {name: store.add_reader(name, kit.reader_order(name)[0]) for name in readers}
    app = create_app(kit, store, readers)
    try:
        server = make_server(host, port, app, threaded=True)
    except OSError as exc:
        raise OSError(f"--host {host} --port {port}: cannot listen: {exc}") from None
    if not log.isEnabledFor(logging.INFO):  # werkzeug logs every request line, tokens included, at INFO
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    shown = f"[{host}]" if ":" in host else host
    for name, token in tokens.items():
        position, screens = reader_position(kit, store, name)
        announce(f"{name}: http://{shown}:{server.server_port}/r/{token}/  ({position} of {len(screens)} done)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach it and knows a reader's URL can score", host)
    try:
        server.serve_forever()
    finally:
        server.server_close()
