"""A fast loopback OpenAI-compatible chat server for bench/generate_scale.py (never a test teacher).

    python bench/load_server.py [--seed 0]      # prints "port N" once listening on 127.0.0.1

Answers the generate recipes' prompts at once with synthetic but varied text: a self-instruct
prompt gets a continuation of its numbered list (new instructions from bench/rouge_filter.py's
instruction-like generator; 1 in 20 a perturbed copy of a recent one, a near duplicate), a classification
question gets Yes or No, an instance prompt gets examples in the format asked for. Raw asyncio
HTTP/1.1 with keep-alive, so the server costs little next to the client under test. It exits when
its parent does.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rouge_filter import _fresh, _perturb  # noqa: E402  (the same instruction-like text the filter bench uses)

SYLLABLES = ("ka", "lo", "mi", "ner", "tos", "vi", "dra", "pul", "sen", "qua", "bri", "mot", "zel", "fa", "rin",
             "gu", "hex", "ol", "tam", "ple", "cor", "yu", "nis", "bel", "dor", "wex", "jo", "stu", "ai", "pem")


class Writer:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.recent: list[str] = []

    def word(self) -> str:
        return "".join(self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(2, 4)))

    def instruction(self) -> str:
        if self.recent and self.rng.random() < 0.05:  # the teacher repeats itself now and then
            return _perturb(self.rng.choice(self.recent), self.rng)
        text = " ".join(_fresh(self.rng).split())
        self.recent = (self.recent + [text])[-200:]
        return text

    def reply(self, prompt: str) -> str:
        r = self.rng
        if prompt.startswith("Come up with a series of tasks:"):
            last = int(re.search(r"\n(\d+)\.$", prompt).group(1))
            items = [self.instruction() for _ in range(last, 16)]
            return " " + "".join(f"{text}\n{n + 1}. " if n + 1 < 16 else text
                                 for n, text in zip(range(last, 16), items))
        if prompt.rstrip().endswith("Is it classification?"):
            return " Yes" if r.random() < 0.3 else " No"
        if prompt.startswith("Given a classification task"):
            return "\n".join(f"Class label: {self.word().title()}\nInput: The {self.word()} {self.word()} was "
                             f"{self.word()}." for _ in range(r.randint(2, 3)))
        return "\n".join(f"Example {i}\nInput: {self.word()} {self.word()} {self.word()}\nOutput: The "
                         f"{self.word()} is {self.word()}." for i in range(1, r.randint(2, 4)))


async def serve(writer_: Writer, reader: asyncio.StreamReader, stream: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = json.loads(await reader.readexactly(length)) if length else {}
            prompt = (body.get("messages") or [{}])[-1].get("content", "")
            text = writer_.reply(prompt)
            payload = json.dumps({
                "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "bench"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4,
                          "total_tokens": (len(prompt) + len(text)) // 4}}).encode()
            stream.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            await stream.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        stream.close()


def exit_with_parent() -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


async def main(seed: int) -> None:
    writer_ = Writer(seed)
    server = await asyncio.start_server(lambda r, w: serve(writer_, r, w), "127.0.0.1", 0, backlog=1024)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    threading.Thread(target=exit_with_parent, daemon=True).start()
    try:
        asyncio.run(main(args.seed))
    except KeyboardInterrupt:
        sys.exit(0)
