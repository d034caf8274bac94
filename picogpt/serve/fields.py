"""The fields of an OpenAI request, each checked with OpenAI's error for a bad one: `APIError`
(the status and the body a client gets), and the checks of integers, numbers, booleans, strings,
stop strings, stream options, and the sampling options every generation request shares."""

import json
import math

from picogpt.errors import PicogptError
from picogpt.generation.stops import MAX_STOP_CHARS
from picogpt.generation.stops import MAX_STOPS as MAX_STOP  # a chat's turn end is one of them

MAX_TOKENS = 4096  # per request and sample: a bound on how long one request may hold the model


class APIError(PicogptError):
    """An error answered to the client in OpenAI's shape, with its HTTP status."""

    def __init__(self, status, message, param=None, code=None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = int(status), message, param, code
        self.kind = kind or ("server_error" if self.status >= 500 else "invalid_request_error")

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def invalid(param, message, code="invalid_value"):
    return APIError(400, message, param=param, code=code)


def only(body, allowed):
    for key in body:
        if key not in allowed:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", param=key,
                           code="unknown_parameter")


def integer(body, name, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"{name} must be an integer, got {json.dumps(value)[:40]}",
                      code="invalid_type")
    if not low <= value <= high:
        raise invalid(name, f"{name} must be in [{low}, {high}], got {value}")
    return value


def number(body, name, default, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, f"{name} must be a number, got {json.dumps(value)[:40]}",
                      code="invalid_type")
    value = float(value)
    above_low = low < value if low_open else low <= value
    if not (math.isfinite(value) and above_low and value <= high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise invalid(name, f"{name} must be in {interval}, got {value:g}")
    return value


def boolean(body, name, default=False):
    return _typed(body, name, default, bool, "{name} must be true or false, got {value}")


def string(body, name, default=None):
    return _typed(body, name, default, str, "{name} must be a string")


def _typed(body, name, default, kind, message):
    """body[name] when it is a `kind`, `default` when it is absent or null; otherwise a 400 whose
    `message` may name the field ({name}) and the value given ({value}, cut short)."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise invalid(name, message.format(name=name, value=json.dumps(value)[:40]),
                      code="invalid_type")
    return value


def stop(body):
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "stop must be a string or a list of strings", code="invalid_type")
    if len(stops) > MAX_STOP:
        raise invalid("stop", f"stop takes at most {MAX_STOP} strings, got {len(stops)}")
    if any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise invalid("stop", f"a stop string must have 1 to {MAX_STOP_CHARS} characters")
    return stops or None


def stream_options(body, stream):
    value = body.get("stream_options")
    if value is None:
        return False
    if not stream:
        raise invalid("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(value, dict):
        raise invalid("stream_options", "stream_options must be an object", code="invalid_type")
    only({f"stream_options.{k}": v for k, v in value.items()}, ("stream_options.include_usage",))
    return boolean(value, "include_usage")


# Chat fields OpenAI's clients and tools send that, in these values, ask nothing of GPT-2: taken
# and ignored. Any other value asks for what picogpt has not (tools, JSON output, a logit bias,
# stored completions, audio): a 400 naming the field.
CHAT_NO_OPS = {"logit_bias": ({},), "response_format": ({"type": "text"},), "tools": ([],),
               "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False),
               "store": (False,), "service_tier": ("auto", "default"),
               "modalities": (["text"],)}  # fmt: skip


def no_ops(body, allowed):
    """Check that each of `allowed`'s fields (name -> the values that ask nothing) in `body` has
    one of its values."""
    for name, values in allowed.items():
        value = body.get(name)
        if value is not None and not any(value == v and type(value) is type(v) for v in values):
            raise invalid(name, f"{name} {json.dumps(value)[:60]} is not supported here (GPT-2 "
                                f"has no tools, JSON mode or logit bias)")  # fmt: skip
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise invalid("metadata", "metadata must be an object", code="invalid_type")


SAMPLING_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
                   "stream_options", "stop", "presence_penalty", "frequency_penalty", "seed",
                   "user")


def sampling(body, default_max_tokens, max_tokens_name="max_tokens"):
    """The options every generation request shares, checked, as Model.complete's keywords."""
    string(body, "model")
    string(body, "user")
    return dict(
        n=integer(body, max_tokens_name, default_max_tokens, 0, MAX_TOKENS),
        temperature=number(body, "temperature", 1.0, 0, 2),
        top_p=number(body, "top_p", None, 0, 1, low_open=True),
        top_k=integer(body, "top_k", 40, 0, 1 << 31),
        stop=stop(body),
        presence_penalty=number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2, 2),
        seed=integer(body, "seed", None, 0, (1 << 64) - 1),
    )
