#!/usr/bin/env bash
# TorchServe's frontend needs a Java runtime (11 or newer). Use the one on PATH or in
# JAVA_HOME; else install OpenJDK 17 with apt-get when we may; else say how and stop.
set -u
java_major() {
  "$1" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'
}
for candidate in "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java 2>/dev/null)"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then
    major=$(java_major "$candidate")
    if [ -n "$major" ] && [ "$major" -ge 11 ]; then exit 0; fi
    echo "ensure_java: $candidate is Java $major; TorchServe needs 11 or newer" >&2
  fi
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "ensure_java: no Java 11+ found; installing openjdk-17-jre-headless with apt-get" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q openjdk-17-jre-headless >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openjdk-17-jre-headless >/dev/null; } \
    && command -v java >/dev/null && exit 0
fi
cat >&2 <<'MSG'
ensure_java: TorchServe needs a Java runtime, version 11 or newer, and none was found.
  Debian/Ubuntu:  sudo apt-get install openjdk-17-jre-headless
  Fedora/RHEL:    sudo dnf install java-17-openjdk-headless
  macOS:          brew install openjdk@17
  or set JAVA_HOME to an existing JDK/JRE 11+ and run make again.
MSG
exit 1
