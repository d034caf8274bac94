"""Take docs/serve.png, the README's picture of the page: `picogpt serve` with the bundled
shakespeare-char model, a generation run from URL parameters, the popup of one token shown.

    python docs/serve_screenshot.py       (needs Chromium: apt-get install chromium)
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from _browser import Browser  # noqa: E402

import picogpt  # noqa: E402
from picogpt.serve.transport import Server  # noqa: E402

QUERY = "prompt=ROMEO%3A&max_tokens=160&temperature=0.8&top_k=40&seed=7&run=1"
FINISHED = "['done', 'error'].includes(document.body.dataset.state)"


def main(out=ROOT / "docs" / "serve.png"):
    model = picogpt.load("shakespeare-char")
    with Server(model, "shakespeare-char", port=0, log=lambda line: None) as s, \
            tempfile.TemporaryDirectory() as profile, Browser(profile, 960, 760) as b:
        b.goto(f"{s.url}/?{QUERY}")
        b.wait_for(FINISHED, timeout=120)
        # Hover the token of the first generated line where the model hesitated the most.
        x, y = b.evaluate("""(() => {
            const spans = [...document.querySelectorAll('#output .tok')].slice(8, 40)
              .filter(s => s.getClientRects()[0]?.width > 2);
            const s = spans.reduce((a, b) => (+a.dataset.p < +b.dataset.p ? a : b));
            const r = s.getClientRects()[0];
            return [r.x + r.width / 2, r.y + r.height / 2]; })()""")
        b.mouse_move(x, y)
        b.wait_for("!document.getElementById('popup').hidden")
        b.screenshot(out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
