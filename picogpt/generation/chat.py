"""The chat prompt that `picogpt chat` and the server share: GPT-2 is not a chat model, so a
conversation is a text it continues, and the assistant's turn ends where its line ends.

    Preamble (a line saying what the conversation is, and one example exchange)
    User: the first message
    Assistant: the reply
    User: the new message
    Assistant:

The model continues after "Assistant:" and the reply ends at its newline: generate with
stop=REPLY_STOP."""

REPLY_STOP = "\n"
CHAT_INTRO = (
    "The following is a conversation between a curious person and a friendly, knowledgeable "
    "assistant. The assistant answers in a sentence or two.\n\n"
)
CHAT_EXAMPLE = (
    "User: Hi! Who are you?\n"
    "Assistant: Hello! I'm an assistant. Ask me anything and I'll do my best to help.\n"
)
CHAT_PREAMBLE = CHAT_INTRO + CHAT_EXAMPLE
ROLES = {"user": "User", "assistant": "Assistant"}


class Conversation:
    """The chat prompt: preamble + the turns so far + the new message, kept within the context.

    Each turn the whole conversation is handed to the model, which reuses its KV cache for the
    longest prefix it has already seen, so only the new message and the reply cost compute. The
    prefix stays put (the preamble, then turns that are only ever appended), except when the
    context is full and the oldest turns are dropped."""

    def __init__(self, model, reply_tokens, preamble=CHAT_PREAMBLE):
        self.model = model
        try:
            model.encode(preamble)
        except ValueError:  # a character-level model that never saw some of its characters
            preamble = ""
        self.preamble = preamble
        # (role, text) lines, "user" or "assistant"; a reply as generated (its leading space).
        self.turns = []
        self.message = None  # from_messages: the last user message, which prompt() answers
        self.budget = model.hparams["n_ctx"] - reply_tokens  # prompt tokens we can afford
        if self.budget < 1:
            raise ValueError(f"a reply of {reply_tokens} tokens leaves no room for the "
                             f"conversation (context {model.hparams['n_ctx']})")

    @classmethod
    def from_messages(cls, model, messages, reply_tokens):
        """The conversation of OpenAI chat `messages` (dicts with "role" system, developer, user
        or assistant, and "content" a string or a list of {"type": "text", "text": ...}).
        System messages replace the preamble's first paragraph; user and assistant messages
        are the turns, in order. Its `prompt()` is the text whose continuation is the next
        assistant reply."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} objects")
        system, turns = [], []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] must be an object with role and content")
            role, text = message.get("role"), _content_text(message.get("content"), i)
            if role in ("system", "developer"):
                system.append(text.strip())
            elif role in ROLES:
                turns.append((role, text.strip()))
            else:
                raise ValueError(f"messages[{i}].role must be system, user or assistant, "
                                 f"got {role!r}")
        preamble = CHAT_PREAMBLE
        if system:
            preamble = "\n".join(system) + "\n\n" + CHAT_EXAMPLE
        conversation = cls(model, reply_tokens, preamble)
        if turns and turns[-1][0] == "user":  # the message to answer: never dropped
            conversation.message = turns.pop()[1]
        # A reply as generated begins with a space ("Assistant: Hello"): give it one.
        conversation.turns = [(r, " " + t if r == "assistant" and t else t) for r, t in turns]
        return conversation

    def prompt(self, message=None):
        """The text to continue for the reply to `message` (None: to the messages given to
        from_messages)."""
        message = self.message if message is None else message
        current = ("" if message is None else self._line("user", message)) + "Assistant:"
        if len(self.model.encode(self.preamble + current)) > self.budget:
            self.preamble = ""  # a tiny context: even the preamble does not fit
        while True:
            history = "".join(self._line(role, text) for role, text in self.turns)
            text = self.preamble + history + current
            if len(self.model.encode(text)) <= self.budget:
                return text
            if not self.turns:
                return self._keep_end(current)  # a message longer than the context
            self.turns.pop(0)  # forget the oldest line

    def add(self, message, reply):
        """Record a turn: the user's message and the reply as generated."""
        self.turns += [("user", message), ("assistant", reply)]

    @staticmethod
    def _line(role, text):
        sep = " " if role == "user" else ""  # a reply keeps the space it was generated with
        return f"{ROLES[role]}:{sep}{text}\n"

    def _keep_end(self, text):
        """The longest end of `text` that fits the budget (a very long message)."""
        ids = self.model.encode(text)[-self.budget :]
        text = self.model.decode(ids)
        while len(self.model.encode(text)) > self.budget and text:
            text = text[1:]
        return text


def chat_prompt(model, messages, reply_tokens):
    """The prompt for the next assistant reply to OpenAI chat `messages`, within the context
    that leaves `reply_tokens` for the reply; generate it with stop=REPLY_STOP."""
    return Conversation.from_messages(model, messages, reply_tokens).prompt()


def _content_text(content, i):
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError(f"messages[{i}].content parts must be text parts")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
