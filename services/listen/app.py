"""The listening page: routes only; pairs, answers, voice and figures live in their own modules.

Per-request state (the rater, the presentation) comes from the request and the database,
never from the app or a module."""

import json
import secrets

from flask import Flask, abort, redirect, render_template, request, send_file, url_for
from werkzeug.wrappers import Response

from steering.errors import InvalidArgument, NotFoundError, SteeringError, Unavailable
from steering.questions import question

from .answers import SIDES, AlreadyAnswered, AnswerStore
from .pairs import Pair
from .results import as_csv, as_json, plot_png, summarise
from .voice import Voice, VoiceMissing

RATER_COOKIE = "listen_rater"
MAX_RATER = 64

STATUS: tuple[tuple[type[SteeringError], int], ...] = (
    (NotFoundError, 404), (InvalidArgument, 400), (AlreadyAnswered, 409), (Unavailable, 503),
)


def _status(exc: SteeringError) -> int:
    return next((code for kind, code in STATUS if isinstance(exc, kind)), 500)


def create_app(pairs: dict[str, Pair], store: AnswerStore, voice: Voice) -> Flask:
    app = Flask(__name__)

    def pair_or_404(pair_id: str) -> Pair:
        if pair_id not in pairs:
            raise NotFoundError(f"no pair with id {pair_id!r} in this listening test")
        return pairs[pair_id]

    @app.errorhandler(SteeringError)
    def steering_error(exc: SteeringError) -> tuple[str, int]:
        code = _status(exc)
        return render_template("error.html", message=str(exc), code=code), code

    @app.get("/")
    def index() -> Response | str:
        rater = request.cookies.get(RATER_COOKIE)
        if not rater:
            return render_template("rater.html")
        left = [pair_id for pair_id in pairs if pair_id not in store.answered_by(rater)]
        if not left:
            return render_template("done.html", rater=rater, total=len(pairs))
        return redirect(url_for("rate", pair_id=secrets.choice(left)))

    @app.post("/rater")
    def set_rater() -> Response:
        rater = request.form.get("rater", "").strip()
        if not rater or len(rater) > MAX_RATER:
            raise InvalidArgument(f"enter a name or code of 1 to {MAX_RATER} characters")
        resp = redirect(url_for("index"), code=303)
        resp.set_cookie(RATER_COOKIE, rater, samesite="Strict", httponly=True)
        return resp

    @app.get("/rate/<pair_id>")
    def rate(pair_id: str) -> Response | str:
        pair = pair_or_404(pair_id)
        rater = request.cookies.get(RATER_COOKIE)
        if not rater:
            return redirect(url_for("index"))
        shown = store.present(pair, rater)
        texts = {side: pair.steered if side == shown.steered_side else pair.plain for side in SIDES}
        voice_error = None
        try:  # rendered now (or found cached) so the page can say at once when the voice is missing
            for text in texts.values():
                voice.render(text)
        except VoiceMissing as exc:
            voice_error = str(exc)
        return render_template("rate.html", pair=pair, token=shown.token, texts=texts, question=question(pair.concept),
                               rater=rater, voice_error=voice_error, done=len(store.answered_by(rater)),
                               total=len(pairs))

    @app.get("/audio/<token>/<side>")
    def audio(token: str, side: str) -> Response:
        if side not in SIDES:
            abort(404)
        shown = store.presentation(token)
        pair = pair_or_404(shown.pair_id)
        path = voice.render(pair.steered if side == shown.steered_side else pair.plain)
        return send_file(path, mimetype="audio/wav", max_age=3600)

    @app.post("/answer")
    def answer() -> Response:
        pair = pair_or_404(request.form.get("pair_id", ""))
        store.answer(request.form.get("token", ""), pair.id, request.form.get("answer", ""))
        return redirect(url_for("index"), code=303)

    @app.get("/results")
    def results() -> str:
        return render_template("results.html", rows=summarise(store.counts()))

    @app.get("/results.json")
    def results_json() -> Response:
        return Response(json.dumps(as_json(summarise(store.counts())), indent=2), mimetype="application/json")

    @app.get("/results.csv")
    def results_csv() -> Response:
        return Response(as_csv(summarise(store.counts())), mimetype="text/csv",
                        headers={"Content-Disposition": "inline; filename=listen-results.csv"})

    @app.get("/results.png")
    def results_png() -> Response:
        return Response(plot_png(summarise(store.counts())), mimetype="image/png")

    return app
