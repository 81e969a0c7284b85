"""The personal-profile generator: every validated concept, for an adult's own use.

A program of its own, never a switch on Blip's (`python -m generator.server` has no way to
become this one), so no flag, variable or file given to Blip's generator can unblock a
concept: `python -m generator.personal --help`.
"""

from steering.profiles import Profile

from .server import build_parser, parse_config, run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("generator.personal", "Steered streaming generation over gRPC, personal profile: "
                          "every validated concept. Not for a child: Blip runs `python -m generator.server`.")
    parser.add_argument("--no-guard", action="store_true", help="switch the content guard off")
    return run(*parse_config(parser, argv, Profile.PERSONAL))


if __name__ == "__main__":
    raise SystemExit(main())
