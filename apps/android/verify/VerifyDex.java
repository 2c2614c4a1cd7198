package org.edgespec.chat;

// Loads the app's classes (the dex turned back into JVM bytecode by enjarify) with every method verified
// (java -Xverify:all) against stubs of the Android classes they use, then runs AssetClient.mimeType. The stubs
// carry the real class hierarchy and the signatures called, so the verifier checks register types, the flow of
// values into each call and the calls' argument types; whether those methods exist on a device is not checked.
public final class VerifyDex {
    public static void main(String[] args) throws Exception {
        for (String name : new String[] {"org.edgespec.chat.MainActivity", "org.edgespec.chat.AssetClient"}) {
            Class.forName(name);
            System.out.println("verified " + name);
        }
        String[][] expected = {{"web/index.html", "text/html"}, {"web/app.js", "text/javascript"},
            {"web/vendor/ort.wasm.min.mjs", "text/javascript"}, {"web/vendor/ort-wasm-simd-threaded.wasm", "application/wasm"},
            {"web/chat.css", "text/css"}, {"web/bundle/manifest.json", "application/json"},
            {"web/manifest.webmanifest", "application/manifest+json"}, {"web/icon.svg", "image/svg+xml"},
            {"web/bundle/target/fused.onnx", "application/octet-stream"}};
        for (String[] pair : expected) {
            String type = AssetClient.mimeType(pair[0]);
            if (!type.equals(pair[1])) throw new AssertionError(pair[0] + " gets " + type + ", not " + pair[1]);
        }
        System.out.println("mime types ok");
    }
}
