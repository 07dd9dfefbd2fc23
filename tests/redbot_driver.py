"""Run REDbot on several URLs in one process and print its notes as JSON: `python redbot_driver.py URL...`.

Used by tests/test_redbot.py. One process for all URLs because importing REDbot costs more than checking a
URL on loopback; the checks run concurrently on REDbot's own event loop (thor). Each URL gets the same
requests `redbot URL` would make: the request itself, then the conditional (If-None-Match, If-Modified-Since),
Range and gzip-negotiation subrequests, whose findings REDbot adds to the main response's notes.
Output: {url: {"status": int | null, "error": str | null, "notes": [{"level", "id", "summary"}, ...]}}.
"""

from __future__ import annotations

import json
import sys
from configparser import ConfigParser
from typing import Any

import thor
from redbot.resource import HttpResource


def _notes(notes: Any) -> list[dict[str, str]]:
    out = []
    for note in notes:
        out.append({"level": note.level.name, "id": type(note).__name__, "summary": str(note.summary)})
        out.extend(_notes(note.subnotes))
    return out


def main(urls: list[str]) -> int:
    parser = ConfigParser()
    # Loopback is what the tests serve on; REDbot refuses private addresses unless told otherwise.
    parser.read_dict({"redbot": {"enable_local_access": "True"}})
    config = parser["redbot"]
    results: dict[str, dict[str, Any]] = {}
    pending = set(urls)

    def finish(url: str, resource: HttpResource) -> None:
        response = resource.response
        error = resource.fetch_error
        results[url] = {
            "status": int(response.status_code) if response.complete and response.status_code else None,
            "error": None if error is None else str(error.desc),
            "notes": _notes(response.notes),
        }
        pending.discard(url)
        if not pending:
            thor.stop()

    for url in urls:
        resource = HttpResource(config)
        resource.set_request(url)
        resource.once("check_done", lambda url=url, resource=resource: finish(url, resource))
        resource.check()
    thor.schedule(60, thor.stop)  # never hang a test run
    thor.run()
    json.dump(results, sys.stdout, indent=1)
    return 0 if not pending else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
