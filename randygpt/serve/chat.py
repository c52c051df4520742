"""The chat template: messages as a plain-text transcript a base model can continue.

A randyGPT model is a base model trained on the user's own text, often one token per
character: it has never seen ChatML's `<|im_start|>` markers and a char model could not even
spell them. So a conversation is written the way a play, a chat log or a forum thread writes
one, and the model is asked to continue it:

    {system text}                        <- system / developer messages, then a blank line
                                         
    {user name}: {user text}             <- one line per message, "Name: text"
    {assistant name}: {assistant text}
    {user name}: {user text}
    {assistant name}:                    <- the prompt ends here; the reply follows

The reply ends at the model's end of document, at max_tokens, at any stop string of the
request, or where the model starts the user's next line ("\\n{user name}:", added as a stop
string). Speaker names are the server's (--user-name / --assistant-name, default "User" and
"Assistant"; for a model trained on Shakespeare, say, "ROMEO" and "JULIET"); a message's
`name` field overrides its role's name. Every character must be one the tokenizer knows.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChatTemplate:
    user_name: str = "User"
    assistant_name: str = "Assistant"

    def render(self, messages) -> str:
        """messages: [(role, name or None, text), ...] -> the prompt text."""
        system = [text for role, _, text in messages if role in ("system", "developer")]
        lines = [f"{name or self.name_of(role)}: {text}"
                 for role, name, text in messages if role in ("user", "assistant")]
        head = "\n".join(system) + "\n\n" if system else ""
        return head + "".join(line + "\n" for line in lines) + f"{self.assistant_name}:"

    def name_of(self, role: str) -> str:
        return self.user_name if role == "user" else self.assistant_name

    def stops(self) -> list[str]:
        return [f"\n{self.user_name}:"]
