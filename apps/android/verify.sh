#!/usr/bin/env bash
# Checks a built APK as far as a machine without Android can: its signature (apksigner verify), its manifest
# (aapt dump badging), its dex (dexdump) and the dex's bytecode (verify/dex.sh). Installing and running it on a
# device or emulator is not possible here (README.md).
#
#   apps/android/verify.sh [APK]      # default: apps/android/build/edgespec-chat.apk
#
# Needs: apt-get install apksigner aapt dexdump enjarify default-jdk-headless
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
apk="$(realpath "${1:-$here/build/edgespec-chat.apk}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

apksigner verify --verbose "$apk" | grep -E "^Verifies|v2 scheme|v3 scheme"
aapt dump badging "$apk" | grep -E "^package:|^sdkVersion|^targetSdkVersion|^launchable-activity"
(cd "$work" && unzip -q "$apk" classes.dex)
dexdump "$work/classes.dex" | grep "Class descriptor"
"$here/verify/dex.sh" "$work/classes.dex"
