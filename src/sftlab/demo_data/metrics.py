"""The demo's own metric (eval.metrics in demo.yaml): is the answer the right record?

An sftlab metric is a function `score(answer, reference, prompt)` returning a number in
[0, 1] or a bool. This one asks what the task asks: one JSON object, with exactly the
house keys, holding the person's values. Key order and spacing do not matter; a record
with an extra key, a missing key, prose around it or a wrong value does not count.
"""

import json


def record(answer: str, reference: str, prompt: str) -> bool:
    try:
        return json.loads(answer) == json.loads(reference)
    except ValueError:
        return False
