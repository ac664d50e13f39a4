#!/usr/bin/env python3
"""Check a docker-archive image (as `docker save` or dockerTools write it) against
image-facts.json: same name:tag, config (User, Entrypoint, ExposedPorts, Env, created)
and exactly the listed files and directories, with their modes, owned by root.
Nothing else is allowed: no /nix/store, no symlinks, no shell. /bin/web must carry its
dependency list (`cargo auditable`'s .dep-v0 section, zlib-compressed JSON), and that list must
agree with Cargo.lock: every crate at its locked version and source, every edge one the lock
has, all reachable from the root, and every dependency Cargo.toml names directly present.

Usage: check-image.py IMAGE_FACTS_JSON IMAGE_TARBALL [--allow-dynamic] [--docker-built] [--cargo-dir=DIR]
  --allow-dynamic  do not require /bin/web to be statically linked
  --docker-built   for an image from `docker build` + `docker save`: accept any name:tag and
                   creation date, and the default PATH that Docker adds to every image
  --cargo-dir=DIR  where Cargo.toml and Cargo.lock are (default: this repository's root)
"""

import json
import os
import posixpath
import struct
import sys
import tarfile
import tomllib
import zlib


DOCKER_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def fail(msg):
    print(f"image check FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def norm(name):
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/").rstrip("/")


def elf_has_interpreter(data):
    """True if the ELF file asks for a dynamic loader (PT_INTERP)."""
    if data[:4] != b"\x7fELF":
        fail("/bin/web is not an ELF executable")
    endian = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # ELFCLASS64
        (phoff,) = struct.unpack_from(endian + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36)
    else:
        (phoff,) = struct.unpack_from(endian + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x2A)
    for i in range(phnum):
        (p_type,) = struct.unpack_from(endian + "I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return True
    return False


def elf_section(data, wanted):
    """The bytes of the ELF section named wanted, or None (64- and 32-bit, either endianness)."""
    e = "<" if data[5] == 1 else ">"
    if data[4] == 2:
        (shoff,) = struct.unpack_from(e + "Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x3A)
        header = lambda i: struct.unpack_from(e + "IIQQQQ", data, shoff + i * shentsize)  # noqa: E731
    else:
        (shoff,) = struct.unpack_from(e + "I", data, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x2E)
        header = lambda i: struct.unpack_from(e + "IIIIII", data, shoff + i * shentsize)  # noqa: E731
    strtab = header(shstrndx)
    for i in range(shnum):
        name, _, _, _, offset, size = header(i)
        start = strtab[4] + name
        if data[start:data.index(b"\0", start)].decode() == wanted:
            return data[offset:offset + size]
    return None


def check_dependencies(binary, cargo_dir):
    """The dependency list cargo auditable embeds in /bin/web, held to Cargo.lock."""
    section = elf_section(binary, ".dep-v0") if binary[:4] == b"\x7fELF" else None
    if section is None:
        fail("/bin/web has no .dep-v0 section: it was not built with `cargo auditable build`")
    embedded = json.loads(zlib.decompress(section))["packages"]
    manifest = tomllib.load(open(os.path.join(cargo_dir, "Cargo.toml"), "rb"))
    locked = tomllib.load(open(os.path.join(cargo_dir, "Cargo.lock"), "rb"))["package"]
    by_name = {}
    for p in locked:
        by_name.setdefault(p["name"], []).append(p)

    def lock_dep(spec):  # "name", "name version" or "name version (source)"
        name, *version = spec.split(" ")
        return (name, version[0] if version else by_name[name][0]["version"])

    lock = {(p["name"], p["version"]): p for p in locked}
    edges = {(k, lock_dep(d)) for k, p in lock.items() for d in p.get("dependencies", [])}
    keys = [(p["name"], p["version"]) for p in embedded]
    roots = [k for k, p in zip(keys, embedded) if p.get("root")]
    package = manifest["package"]
    if roots != [(package["name"], package["version"])] or len(set(keys)) != len(keys):
        fail(f".dep-v0: roots {roots} (expected only {package['name']} {package['version']}), or a crate listed twice")
    for key, p in zip(keys, embedded):
        if key not in lock:
            fail(f".dep-v0 lists {key[0]} {key[1]}, which Cargo.lock does not have")
        if (p.get("source") == "local") != (key in roots) or (key not in roots and not lock[key].get("source", "").startswith("registry+")):
            fail(f".dep-v0: {key[0]} {key[1]} comes from {p.get('source')!r}, Cargo.lock says {lock[key].get('source')!r}")
        for j in p.get("dependencies", []):
            if (key, keys[j]) not in edges:
                fail(f".dep-v0: {key[0]} {key[1]} -> {keys[j][0]} {keys[j][1]} is not an edge of Cargo.lock")
    seen, todo = set(), [keys.index(roots[0])]
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo += embedded[i].get("dependencies", [])
    if len(seen) != len(keys):
        fail(f".dep-v0: {sorted(keys[i][0] for i in set(range(len(keys))) - seen)} not reachable from {roots[0][0]}")
    direct = {keys[j][0] for j in embedded[keys.index(roots[0])].get("dependencies", [])}
    missing = sorted(set(manifest["dependencies"]) - direct)
    if missing:
        fail(f".dep-v0: {missing}, dependencies in Cargo.toml, are not listed")
    return len(keys)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    allow_dynamic = "--allow-dynamic" in sys.argv
    cargo_dir = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--cargo-dir=")),
                     os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    docker_built = "--docker-built" in sys.argv
    if len(args) != 2:
        fail(__doc__)
    facts = json.load(open(args[0]))
    outer = tarfile.open(args[1], "r:*")
    members = {norm(m.name): m for m in outer.getmembers()}

    def read(name):
        if name not in members:
            fail(f"{name} missing from the image archive")
        return outer.extractfile(members[name]).read()

    manifest = json.loads(read("manifest.json"))
    if len(manifest) != 1:
        fail(f"expected one image in the archive, found {len(manifest)}")
    manifest = manifest[0]
    want_tag = f"{facts['name']}:{facts['tag']}"
    if manifest.get("RepoTags") != [want_tag] and not docker_built:
        fail(f"RepoTags {manifest.get('RepoTags')} != [{want_tag!r}]")

    image = json.loads(read(norm(manifest["Config"])))
    config = image.get("config") or {}
    expect = {
        "User": facts["user"],
        "Entrypoint": facts["entrypoint"],
        "ExposedPorts": sorted(facts["exposedPorts"]),
        "Env": facts["env"],
        "Cmd": None,
    }
    got = {
        "User": config.get("User"),
        "Entrypoint": config.get("Entrypoint"),
        "ExposedPorts": sorted((config.get("ExposedPorts") or {}).keys()),
        "Env": [e for e in config.get("Env") or [] if not (docker_built and e == DOCKER_PATH)],
        "Cmd": config.get("Cmd") or None,
    }
    for key in expect:
        if got[key] != expect[key]:
            fail(f"config {key} is {got[key]!r}, expected {expect[key]!r}")
    if not docker_built and image.get("created") not in (facts["created"], facts["created"].replace("Z", "+00:00")):
        fail(f"created is {image.get('created')!r}, expected {facts['created']!r}")

    # Union of all layers (the image is FROM scratch; a later entry wins).
    entries = {}
    contents = {}
    for layer in manifest["Layers"]:
        inner = tarfile.open(fileobj=outer.extractfile(members[norm(layer)]), mode="r:*")
        for m in inner.getmembers():
            name = norm(m.name)
            if name in ("", "."):
                continue
            if posixpath.basename(name).startswith(".wh."):
                fail(f"unexpected whiteout {name}")
            entries[name] = m
            if m.isfile():
                contents[name] = inner.extractfile(m).read()

    files = {norm(p): spec for p, spec in facts["files"].items()}
    dirs = {norm(p): spec for p, spec in facts["dirs"].items()}
    parents = set()
    for p in list(files) + list(dirs):
        d = posixpath.dirname(p)
        while d:
            parents.add(d)
            d = posixpath.dirname(d)

    extra = sorted(set(entries) - set(files) - set(dirs) - parents)
    if extra:
        fail(f"unexpected entries in the image: {extra}")
    for specs, is_kind, kind in ((files, "isfile", "a regular file"), (dirs, "isdir", "a directory")):
        for name, spec in specs.items():
            m = entries.get(name)
            if m is None or not getattr(m, is_kind)():
                fail(f"/{name} missing or not {kind}")
            if m.mode & 0o7777 != int(spec["mode"], 8):
                fail(f"/{name} has mode {oct(m.mode & 0o7777)}, expected {spec['mode']}")
    for name, spec in files.items():
        if "content" in spec and contents[name].decode() != spec["content"]:
            fail(f"/{name} content {contents[name]!r} != {spec['content']!r}")
    for name in parents:
        if name in entries and not entries[name].isdir():
            fail(f"/{name} is not a directory")
    for name, m in entries.items():
        if (m.uid, m.gid) != (0, 0):
            fail(f"/{name} is owned by {m.uid}:{m.gid}, expected 0:0")

    for name, spec in files.items():
        if spec.get("source") == "ca-bundle" and b"BEGIN CERTIFICATE" not in contents[name]:
            fail(f"/{name} holds no certificates")
        if spec.get("source") == "binary" and not allow_dynamic:
            if elf_has_interpreter(contents[name]):
                fail(f"/{name} is dynamically linked (has PT_INTERP); it must be static")
        if spec.get("source") == "binary":
            crates = check_dependencies(contents[name], cargo_dir)

    print(f"image OK: {want_tag}, {len(files)} files, {len(dirs)} dirs, config as in facts; "
          f"/bin/web lists {crates} crates (.dep-v0), all as in Cargo.lock")


if __name__ == "__main__":
    main()
