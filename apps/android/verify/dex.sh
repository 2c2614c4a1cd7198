#!/usr/bin/env bash
# Bytecode verification of a dex without Android: enjarify turns it back into JVM classes, which
# `java -Xverify:all` loads against stubs of the Android classes they call (stubs/), then VerifyDex.java runs
# AssetClient's MIME table. A register holding the wrong type for a call fails here with a VerifyError.
#
#   apps/android/verify/dex.sh classes.dex
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dex="$(realpath "$1")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# enjarify runs on Debian's python3 (its module is installed for that interpreter only).
PATH="/usr/bin:$PATH" enjarify "$dex" -o "$work/app.jar" -f >/dev/null
mkdir "$work/stubs" "$work/harness"
javac -nowarn -d "$work/stubs" $(find "$here/stubs" -name '*.java')
javac -nowarn -cp "$work/stubs:$work/app.jar" -d "$work/harness" "$here/VerifyDex.java"
# (JDK 13 on warns that -Xverify is deprecated; it still verifies every class it loads.)
java -Xverify:all -XX:-UsePerfData -cp "$work/stubs:$work/app.jar:$work/harness" org.edgespec.chat.VerifyDex \
  2>"$work/java.err" || { grep -v "deprecated" "$work/java.err" >&2; exit 1; }
