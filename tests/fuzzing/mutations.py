"""Mutating a patch text (its lines, hunk headers, file headers, line ends) and a --finding
document (its values, then its text: truncated, nested deep, badly encoded, ...)."""

from __future__ import annotations

import copy
import json
import random
import re


# ---------------------------------------------------------------------- patch mutations

_HUNK_NUMBERS = ["0", "1", "-1", "99999999999999999999999", "4294967296", "2147483648", "", "x", "00", "1e3"]


def _mutate_patch(rnd: random.Random, text: str) -> tuple[str, str]:
    lines = text.split("\n")
    n = len(lines)
    hunks = [k for k, ln in enumerate(lines) if ln.startswith("@@")]
    headers = [k for k, ln in enumerate(lines) if ln.startswith(("diff --git", "--- ", "+++ ", "index "))]
    body = [k for k, ln in enumerate(lines) if ln[:1] in ("+", "-", " ") and k not in headers]
    op = rnd.choice(["delete", "duplicate", "swap", "hunk", "hunk", "hunk", "header", "header", "junk", "crlf",
                     "long", "empty", "truncate", "marker", "marker", "nonewline", "context", "git-extended",
                     "tabs", "repeat-file"])
    if op == "delete" and n:
        k = rnd.choice(body or list(range(n)))
        count = rnd.choice([1, 1, 2, 5])
        del lines[k:k + count]
        return "\n".join(lines), f"deleted {count} line(s) at {k}"
    if op == "duplicate" and n:
        k = rnd.choice(body or list(range(n)))
        lines.insert(k, lines[k])
        return "\n".join(lines), f"duplicated line {k}"
    if op == "swap" and n > 1:
        k = rnd.choice(body or list(range(n - 1)))
        k = min(k, n - 2)
        lines[k], lines[k + 1] = lines[k + 1], lines[k]
        return "\n".join(lines), f"swapped lines {k} and {k + 1}"
    if op == "hunk" and hunks:
        k = rnd.choice(hunks)
        m = re.match(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)", lines[k])
        nums = [m.group(i) or "1" for i in (1, 2, 3, 4)] if m else ["1", "1", "1", "1"]
        style = rnd.random()
        if style < 0.6:
            i = rnd.randrange(4)
            nums[i] = rnd.choice(_HUNK_NUMBERS + [str(int(nums[i]) + rnd.choice([-2, -1, 1, 2, 100]))])
            lines[k] = f"@@ -{nums[0]},{nums[1]} +{nums[2]},{nums[3]} @@"
        elif style < 0.75:
            lines[k] = f"@@ -{nums[0]} +{nums[2]} @@"
        elif style < 0.85:
            lines[k] = rnd.choice(["@@", "@@ @@", "@@ -,+, @@", "@@@ -1,2 +1,2 @@@", "@@ -1,2 +1,2", "@@ - +  @@"])
        else:
            lines[k] = lines[k] + rnd.choice([" trailing", "@@", "\t", " @@ -1,1 +1,1 @@"])
        return "\n".join(lines), f"hunk header {k}: {lines[k][:80]!r}"
    if op == "header" and headers:
        k = rnd.choice(headers)
        head = lines[k].split(" ")[0]
        choice = rnd.random()
        if choice < 0.3:
            del lines[k]
            return "\n".join(lines), f"removed header line {k}"
        path = rnd.choice(["/dev/null", "../../etc/passwd", "/abs/path", "a/", "", "a/b c", "a/x\ty", "b/../../x",
                           "a/arch/x86/entry/entry_64.S\t2023-01-01", "arch/x86/entry/calling.h", "ünï",
                           "a/" + "x" * 300, "a/arch/x86/entry/", "a//arch//x86/entry/entry_64.S"])
        if head == "diff":
            lines[k] = rnd.choice([f"diff --git {path} {path}", "diff --git", f"diff --git a/{path}", "diff --gi"])
        elif head in ("---", "+++"):
            lines[k] = f"{head} {path}"
        else:
            lines[k] = rnd.choice(["index", "index zzz..yyy", "index 0000000..1111111 999999"])
        return "\n".join(lines), f"header {k}: {lines[k][:80]!r}"
    if op == "junk":
        junk = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 400))).decode("utf-8", "replace")
        k = rnd.randrange(n + 1)
        lines.insert(k, junk.replace("\n", ""))
        return "\n".join(lines), f"binary junk at line {k}"
    if op == "crlf":
        if rnd.random() < 0.5:
            return "\r\n".join(lines), "CRLF line ends"
        k = rnd.randrange(n) if n else 0
        if n:
            lines[k] += "\r"
        return "\n".join(lines), f"a CR at line {k}"
    if op == "long":
        k = rnd.randrange(n + 1)
        lines.insert(k, rnd.choice(["+", "-", " ", ""]) + "x" * rnd.choice([10000, 100000, 1000000]))
        return "\n".join(lines), f"a very long line at {k}"
    if op == "empty":
        return rnd.choice(["", "\n", " ", "\n\n\n", "\r\n"]), "empty"
    if op == "truncate" and text:
        at = rnd.randrange(len(text))
        return text[:at], f"truncated at {at} of {len(text)} characters"
    if op == "marker" and body:
        k = rnd.choice(body)
        lines[k] = rnd.choice(["+", "-", " ", "", "\\ ", "@"]) + lines[k][1:]
        return "\n".join(lines), f"marker of line {k} changed to {lines[k][:1]!r}"
    if op == "nonewline":
        k = rnd.randrange(n + 1)
        lines.insert(k, "\\ No newline at end of file")
        return "\n".join(lines), f"'\\ No newline' at line {k}"
    if op == "context" and body:
        k = rnd.choice(body)
        lines[k] = lines[k][:1] + rnd.choice(["drifted context", "", "\t", "  spaces  ", lines[k][1:].upper()])
        return "\n".join(lines), f"line {k} text changed"
    if op == "git-extended" and n:
        k = rnd.choice(headers or [0])
        lines.insert(k + 1, rnd.choice(["rename from x", "rename to y", "copy from x", "old mode 100644",
                                        "new mode 100755", "new file mode 100644", "deleted file mode 100644",
                                        "GIT binary patch", "Binary files a/x and b/x differ", "similarity index 90%",
                                        "new file mode 777777", "new mode 100000"]))
        return "\n".join(lines), f"git extended header after line {k}: {lines[k + 1]!r}"
    if op == "tabs" and body:
        k = rnd.choice(body)
        lines[k] = lines[k].replace("\t", "        ") if "\t" in lines[k] else lines[k].replace("    ", "\t")
        return "\n".join(lines), f"whitespace of line {k} changed"
    if op == "repeat-file":
        return text + "\n" + text, "the whole text twice"
    return text, "unchanged"


# ---------------------------------------------------------------------- JSON mutations

_WRONG = [None, True, False, 0, -1, 1.5, 10 ** 30, -(10 ** 30), "", "x", [], {}, [[]], [None], {"a": 1},
          "sync_regs+0xffffffffffffffffff", "nmi@sync_regs", float("inf")]


def _json_paths(doc, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.extend(_json_paths(v, prefix + (k,)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:4]):
            out.extend(_json_paths(v, prefix + (i,)))
    return out


def _mutate_json(rnd: random.Random, doc: dict) -> str:
    viol = [p for p in _json_paths(doc) if p[:1] == ("violations",)]
    paths = viol if viol and rnd.random() < 0.85 else _json_paths(doc)
    path = rnd.choice([p for p in paths if p] or [("violations",)])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    op = rnd.random()
    special = {"hit": [0, -1, 10 ** 20, True, "1", 1.5, None, 2 ** 63],
               "vector": ["bogus", "", "NMI", "irq", "pf", 2, None, "df", "vc"],
               "at": ["", "nosuch", "entry_SYSCALL_64+0xfffff", "entry_SYSCALL_64+1", "+", "sync_regs+-1",
                      "0xffffffff81000000", "entry_SYSCALL_64+0x" + "f" * 40, "paranoid_exit+0x3"],
               "scenario": ["bogus", "", "nmi-from-user", "vc-from-kernel", "irq-from-user", 1, None],
               "features": ["", "bogus", "all", "none", "pti,pcid,fsgsbase,kernel_ibrs", "x86_feature_smap", 0],
               "effects": [["bogus"], [1], "invalidate-user-asid", ["invalidate-user-asid", "invalidate-user-asid"],
                           None, ["switch-kernel-asid"]]}
    if op < 0.3 and isinstance(parent, (dict, list)):
        if isinstance(parent, dict):
            parent.pop(last, None)
        elif isinstance(last, int) and last < len(parent):
            del parent[last]
        return f"deleted {'/'.join(map(str, path))}"
    if op < 0.7 and isinstance(last, str) and last in special:
        value = rnd.choice(special[last])
    elif op < 0.8 and isinstance(parent, list):
        parent.extend(copy.deepcopy(parent[:1]) * rnd.choice([1, 100]))
        return f"extended {'/'.join(map(str, path[:-1]))}"
    else:
        value = rnd.choice(_WRONG)
    parent[last] = value
    return f"{'/'.join(map(str, path))}={json.dumps(value)[:40]}"


def _mutate_json_text(rnd: random.Random, text: str) -> tuple[bytes, str]:
    roll = rnd.random()
    if roll < 0.55:
        return text.encode(), ""
    if roll < 0.62:
        at = rnd.randrange(len(text) + 1)
        return text[:at].encode(), f"truncated at {at}"
    if roll < 0.70:
        depth = rnd.choice([100, 1000, 10000, 100000])
        nest = rnd.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
        where = rnd.choice(["whole", "violations", "injections"])
        if where == "whole":
            return nest.encode(), f"nesting {depth} deep"
        if where == "violations":
            return json.dumps({"violations": "@"}).replace('"@"', nest).encode(), f"violations nested {depth} deep"
        return json.dumps({"violations": [{"scenario": "syscall", "features": "pti", "injections": "@"}]}) \
            .replace('"@"', nest).encode(), f"injections nested {depth} deep"
    if roll < 0.76:
        data = bytearray(text.encode())
        for _ in range(rnd.randint(1, 5)):
            data.insert(rnd.randrange(len(data) + 1), rnd.choice([0xFF, 0xC3, 0x80, 0xFE, 0xED]))
        return bytes(data), "invalid UTF-8"
    if roll < 0.80:
        return text.encode("utf-16"), "UTF-16"
    if roll < 0.84:
        return b"\xef\xbb\xbf" + text.encode(), "a byte order mark"
    if roll < 0.88:
        return (text + rnd.choice(["garbage", "}", "\0", "\n\n{}", " "])).encode(), "trailing text"
    if roll < 0.92:
        return rnd.choice([b"", b"null", b"0", b'"x"', b"{}", b'{"violations": null}', b'{"violations": {}}',
                           b'{"violations": [null]}', b'{"violations": [[]]}', b"NaN", b"Infinity", b"1e999",
                           b'{"violations": [{"scenario": "syscall", "features": "pti", "injections": NaN}]}']), \
            "a small document"
    if roll < 0.96:
        return re.sub(r"\b(\d+)\b", lambda m: rnd.choice(["1e999", "-0", "NaN", "99999999999999999999999",
                                                          m.group(1)]), text, count=50).encode(), "odd numbers"
    return bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 2000))), "binary junk"
