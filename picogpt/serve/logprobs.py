"""OpenAI's logprobs shapes, from what Model.complete reports (each token's id, log-probability
and likeliest alternatives): the completions' lists (tokens, token_logprobs, top_logprobs,
text_offset), an echoed prompt's, and the chat's entries (token, logprob, bytes,
top_logprobs)."""

from picogpt.generation import sampling


def completion_logprobs(model, tokens, token_logprobs, top_logprobs, offsets, prompt=None):
    """OpenAI's completions `logprobs`: tokens (their text), token_logprobs, top_logprobs
    (each the K likeliest and the token itself: up to K + 1, as OpenAI's), text_offset (from
    `offsets`, a TextOffsets); `prompt`'s lists first (echo)."""
    texts = [model.token_text(t) for t in tokens]
    out = {"tokens": texts, "token_logprobs": list(token_logprobs or []),
           "top_logprobs": [with_token(top, text, lp) for top, text, lp in
                            zip(top_logprobs or [], texts, token_logprobs or [])],
           "text_offset": offsets.of(tokens)}  # fmt: skip
    if prompt is not None:
        out = {key: prompt[key] + out[key] for key in out}
    return out


def prompt_logprobs(model, ids, k):
    """The echoed prompt's logprobs: each token's log-probability given the ones before it
    (the first has none), from one forward pass over the prompt, as decoding reports a
    generated token's (sampling.log_softmax, sampling.top_ids)."""
    if not ids:  # an empty prompt has no tokens to score
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    token_lp, top_lp = [None], [None]
    if len(ids) > 1:
        for logits, token in zip(model.logits(ids[:-1]), ids[1:]):  # [T-1, n_vocab]
            row = sampling.log_softmax(logits)
            token_lp.append(float(row[token]))
            likeliest = {model.token_text(int(t)): float(row[t])
                         for t in sampling.top_ids(row, k)}  # fmt: skip
            top_lp.append(with_token(likeliest, model.token_text(token), token_lp[-1]))
    return {"tokens": [model.token_text(t) for t in ids], "token_logprobs": token_lp,
            "top_logprobs": top_lp, "text_offset": TextOffsets(model, 0).of(ids)}


def chat_logprobs(model, tokens, token_logprobs, top_logprobs, k):
    """OpenAI's chat `logprobs.content`: per token its text, logprob, UTF-8 bytes and the k
    likeliest alternatives."""
    content = []
    for token, lp, top in zip(tokens, token_logprobs, top_logprobs):
        top = sorted(top.items(), key=lambda kv: -kv[1])[:k]
        content.append({"token": model.token_text(token), "logprob": lp,
                        "bytes": list(token_bytes(model, token)),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": bytes_of(t)}
                                         for t, v in top]})
    return content


def token_bytes(model, token):
    decode_bytes = getattr(model.tokenizer, "decode_bytes", None)
    if decode_bytes is not None:
        return decode_bytes([token])
    return model.decode([token]).encode("utf-8")


def without_leading_space(content, spoke):
    """A chat reply's logprobs entries less the leading whitespace its content loses: the
    entries of whitespace tokens before the first other, and that one's own leading whitespace
    (its token and bytes), so that their bytes joined are the content's. `spoke` ([bool], kept
    across a stream's chunks): whether a token other than whitespace has come."""
    out = []
    for entry in content:
        if not spoke[0]:
            token = entry["token"].lstrip()
            if not token:
                continue
            cut = len(entry["token"].encode("utf-8")) - len(token.encode("utf-8"))
            entry = {**entry, "token": token, "bytes": entry["bytes"][cut:]}
            spoke[0] = True
        out.append(entry)
    return out


def with_token(top, text, logprob):
    """A completions token's top_logprobs: the K likeliest tokens' and, where it is not among
    them, the token's own (OpenAI: "up to logprobs+1 elements", so that a client can always look
    the token up there)."""
    return top if text in top else {**top, text: logprob}


class TextOffsets:
    """Where each generated token's text begins, in characters from the start of the prompt:
    a token that only completes a character split across tokens begins where that character
    does."""

    def __init__(self, model, start):
        self.decoder, self.at = model.tokenizer.decoder(), start

    def of(self, tokens):
        out = []
        for token in tokens:
            out.append(self.at)
            self.at += len(self.decoder.feed(token))
        return out


def bytes_of(token_text):
    """The UTF-8 bytes of a token's text as Model.token_text gives it ("bytes:\\xe2\\x80" for
    part of a character)."""
    if token_text.startswith("bytes:"):
        try:
            return list(bytes.fromhex(token_text[len("bytes:"):].replace("\\x", "")))
        except ValueError:  # a token whose text really begins with "bytes:"
            pass
    return list(token_text.encode("utf-8"))
