#!/usr/bin/env python3
"""Drive an MCP stdio server with the official Python SDK, the way an agent's client does.

Used by the integration tests against the real `governor mcp` (and by hand against
`cargo run -p governor-mcp --example fake_server`): it spawns the server with the SDK's
stdio client, connects (initialize, or server/discover on 2026-era protocol versions),
lists the tools, makes each call in order, and prints ONE JSON object on stdout:

    {"server": {"name": ..., "version": ...}, "protocol_version": "...",
     "instructions": "..." | null, "tools": [names...],
     "results": [{"tool": ..., "is_error": bool, "text": "...", "data": JSON | null}, ...]}

`text` is the result's text content (blocks joined by newlines); `data` is its structured
content, else its text parsed as JSON, else null. A call the server answers with a
JSON-RPC error instead of a tool result is listed with "is_error": true and a
"protocol_error": {"code", "message"}, and makes the exit status 2 (after printing).
A failure to spawn, connect or list (or the timeout) prints nothing on stdout, says why
on stderr, and exits 1. The server's stderr passes through to ours.

Usage:
    client.py --server-cmd '["governor", "mcp"]' --calls '[{"tool": "status", "args": {}}]'
    client.py --calls-file calls.json -- governor mcp        (argv after --; "-" reads stdin)
Options: --mode auto|legacy|<protocol version> (default auto, the SDK's default),
         --timeout SECONDS (default 60, for the whole session).

Needs the SDK: python3 -m venv target/mcp-venv && target/mcp-venv/bin/pip install mcp==2.3.0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import anyio
from mcp import Client, MCPError, StdioServerParameters
from mcp.types import Implementation


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run MCP tool calls against a stdio server; print one JSON object."
    )
    parser.add_argument("--server-cmd", help="the server's argv, as a JSON array of strings")
    calls = parser.add_mutually_exclusive_group()
    calls.add_argument("--calls", help='JSON array of {"tool": NAME, "args": {...}}')
    calls.add_argument("--calls-file", help="a file holding that array ('-' for stdin)")
    parser.add_argument("--mode", default="auto", help="auto, legacy, or a protocol version")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds, whole session")
    parser.add_argument("command", nargs="*", help="the server's argv (instead of --server-cmd)")
    args = parser.parse_args(argv)

    if args.server_cmd is not None and args.command:
        parser.error("give the server either as --server-cmd or after --, not both")
    if args.server_cmd is not None:
        try:
            command = json.loads(args.server_cmd)
        except json.JSONDecodeError as e:
            parser.error(f"--server-cmd is not JSON: {e}")
        if not (
            isinstance(command, list)
            and command
            and all(isinstance(a, str) for a in command)
        ):
            parser.error("--server-cmd must be a non-empty JSON array of strings")
        args.command = command
    if not args.command:
        parser.error("no server command (--server-cmd or -- COMMAND ARGS...)")

    if args.calls is not None:
        raw = args.calls
    elif args.calls_file is not None and args.calls_file != "-":
        with open(args.calls_file, encoding="utf-8") as f:
            raw = f.read()
    else:
        raw = sys.stdin.read()
    try:
        calls = json.loads(raw)
    except json.JSONDecodeError as e:
        parser.error(f"the calls are not JSON: {e}")
    if not isinstance(calls, list) or not all(
        isinstance(c, dict)
        and isinstance(c.get("tool"), str)
        and isinstance(c.get("args", {}), dict)
        for c in calls
    ):
        parser.error('the calls must be a JSON array of {"tool": NAME, "args": {...}}')
    args.calls = calls
    return args


def result_entry(tool: str, result: Any) -> dict[str, Any]:
    texts = [block.text for block in result.content if getattr(block, "type", None) == "text"]
    text = "\n".join(texts)
    data = result.structured_content
    if data is None:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
    return {"tool": tool, "is_error": bool(result.is_error), "text": text, "data": data}


async def session(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    params = StdioServerParameters(
        command=args.command[0],
        args=args.command[1:],
        # Like any child process (the SDK passes only a safe subset by default): the
        # tests point the server at its socket and logs through the environment.
        env=dict(os.environ),
    )
    status = 0
    async with Client(
        params,
        mode=args.mode,
        client_info=Implementation(name="governor-tests-client", version="0"),
    ) as client:
        tools: list[str] = []
        cursor = None
        while True:
            listing = await client.list_tools(cursor=cursor)
            tools.extend(tool.name for tool in listing.tools)
            cursor = listing.next_cursor
            if cursor is None:
                break

        results = []
        for call in args.calls:
            tool = call["tool"]
            try:
                result = await client.call_tool(tool, call.get("args", {}))
            except MCPError as e:
                status = 2
                results.append(
                    {
                        "tool": tool,
                        "is_error": True,
                        "text": e.message,
                        "data": None,
                        "protocol_error": {"code": e.code, "message": e.message},
                    }
                )
                continue
            results.append(result_entry(tool, result))

        info = client.server_info
        report = {
            "server": {"name": info.name, "version": info.version} if info else None,
            "protocol_version": client.protocol_version,
            "instructions": client.instructions,
            "tools": tools,
            "results": results,
        }
    return report, status


def leaves(e: BaseException) -> list[BaseException]:
    """The innermost exceptions of an (anyio task group's) exception group."""
    subs = getattr(e, "exceptions", None)
    if not subs:
        return []
    found: list[BaseException] = []
    for sub in subs:
        found.extend(leaves(sub) or [sub])
    return found


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    async def run() -> tuple[dict[str, Any], int]:
        with anyio.fail_after(args.timeout):
            return await session(args)

    try:
        report, status = anyio.run(run)
    except TimeoutError:
        print(f"client.py: no complete session within {args.timeout}s", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - any failure of the session is the verdict
        print(f"client.py: MCP session failed: {type(e).__name__}: {e}", file=sys.stderr)
        for leaf in leaves(e):
            print(f"  {type(leaf).__name__}: {leaf}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
