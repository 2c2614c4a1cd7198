#!/usr/bin/env bash
# Builds the Android app from Debian packages only (no Android SDK, Gradle or Maven): the web app (apps/web, built
# by its build.mjs) and a bundle become the APK's assets, smali assembles the two classes into classes.dex, aapt
# links the manifest against Debian's framework-res.apk, zipalign aligns, and apksigner signs with a debug key
# this script generates on first use (build/debug.keystore).
#
#   apps/android/build.sh --bundle DIR [--out DIR]     # -> OUT/edgespec-chat.apk (OUT: apps/android/build)
#
# Needs: apt-get install aapt zipalign apksigner libsmali-java android-framework-res default-jdk-headless,
# node, and `npm ci` in apps/web.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/build"
bundle=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 --bundle DIR [--out DIR]" >&2; exit 2 ;;
  esac
done
[ -n "$bundle" ] || { echo "usage: $0 --bundle DIR [--out DIR]" >&2; exit 2; }
[ -f "$bundle/manifest.json" ] || { echo "$bundle is not an edgespec bundle (no manifest.json)" >&2; exit 2; }
framework=/usr/share/android-framework-res/framework-res.apk
for tool in node smali aapt zipalign apksigner keytool; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (see the comment at the top of $0)" >&2; exit 1; }
done
[ -f "$framework" ] || { echo "$framework is missing: apt-get install android-framework-res" >&2; exit 1; }

mkdir -p "$out"
rm -rf "$out/assets" "$out/classes.dex" "$out/unsigned.apk" "$out/aligned.apk"
node "$here/../web/build.mjs" --out "$out/assets/web" --bundle "$bundle"
smali assemble "$here/smali" -o "$out/classes.dex" --api 24
# Graphs, weights and the WASM runtime are stored uncompressed: the WebView reads them whole, and they hardly shrink.
aapt package -f -M "$here/AndroidManifest.xml" -S "$here/res" -A "$out/assets" -I "$framework" \
  -0 wasm -0 onnx -0 data -0 npz -0 npy -F "$out/unsigned.apk"
(cd "$out" && aapt add unsigned.apk classes.dex >/dev/null)
zipalign -p -f 4 "$out/unsigned.apk" "$out/aligned.apk"
keystore="$out/debug.keystore"
if [ ! -f "$keystore" ]; then
  keytool -genkeypair -keystore "$keystore" -storepass android -keypass android -alias androiddebugkey \
    -keyalg RSA -keysize 2048 -validity 10000 -dname "CN=Android Debug,O=Android,C=US" 2>/dev/null
fi
apksigner sign --ks "$keystore" --ks-pass pass:android --key-pass pass:android --out "$out/edgespec-chat.apk" \
  "$out/aligned.apk"
rm -f "$out/unsigned.apk" "$out/aligned.apk" "$out/edgespec-chat.apk.idsig"
echo "built $out/edgespec-chat.apk ($(du -h "$out/edgespec-chat.apk" | cut -f1))"
