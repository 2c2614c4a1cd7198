# Answers the WebView's requests to https://appassets.androidplatform.net/<path> with assets/<path> from the APK
# (the idea of androidx's WebViewAssetLoader, which needs Gradle to build), with the MIME types browsers require
# (JavaScript modules must be text/javascript, WebAssembly application/wasm); a missing asset is a 404. Other
# hosts are left to the WebView (null). Java equivalent:
#   public WebResourceResponse shouldInterceptRequest(WebView view, WebResourceRequest request) {
#       Uri url = request.getUrl();
#       if (!"appassets.androidplatform.net".equals(url.getHost())) return null;
#       String path = url.getPath().substring(1);
#       if (path.isEmpty() || path.endsWith("/")) path = path.concat("index.html");
#       String type = mimeType(path);
#       try {
#           return new WebResourceResponse(type, null, assets.open(path));
#       } catch (IOException missing) {
#           return new WebResourceResponse("text/plain", null, 404, "Not Found", null,
#                                          new ByteArrayInputStream(new byte[0]));
#       }
#   }
.class public Lorg/edgespec/chat/AssetClient;
.super Landroid/webkit/WebViewClient;
.source "AssetClient.smali"

.field private final assets:Landroid/content/res/AssetManager;

.method public constructor <init>(Landroid/content/res/AssetManager;)V
    .registers 2
    invoke-direct {p0}, Landroid/webkit/WebViewClient;-><init>()V
    iput-object p1, p0, Lorg/edgespec/chat/AssetClient;->assets:Landroid/content/res/AssetManager;
    return-void
.end method

# The MIME type of an asset path by its extension: text/html, text/javascript (.js, .mjs), application/wasm,
# text/css, application/json, application/manifest+json (.webmanifest), image/svg+xml; anything else application/octet-stream.
.method static mimeType(Ljava/lang/String;)Ljava/lang/String;
    .registers 6
    # v0: extensions, v1: types, v2: index, v3: count, v4: scratch; p0 (v5): the path
    const/16 v3, 0x8
    new-array v0, v3, [Ljava/lang/String;
    new-array v1, v3, [Ljava/lang/String;
    const/4 v2, 0x0
    const-string v4, ".html"
    aput-object v4, v0, v2
    const-string v4, "text/html"
    aput-object v4, v1, v2
    const/4 v2, 0x1
    const-string v4, ".js"
    aput-object v4, v0, v2
    const-string v4, "text/javascript"
    aput-object v4, v1, v2
    const/4 v2, 0x2
    const-string v4, ".mjs"
    aput-object v4, v0, v2
    const-string v4, "text/javascript"
    aput-object v4, v1, v2
    const/4 v2, 0x3
    const-string v4, ".wasm"
    aput-object v4, v0, v2
    const-string v4, "application/wasm"
    aput-object v4, v1, v2
    const/4 v2, 0x4
    const-string v4, ".css"
    aput-object v4, v0, v2
    const-string v4, "text/css"
    aput-object v4, v1, v2
    const/4 v2, 0x5
    const-string v4, ".json"
    aput-object v4, v0, v2
    const-string v4, "application/json"
    aput-object v4, v1, v2
    const/4 v2, 0x6
    const-string v4, ".webmanifest"
    aput-object v4, v0, v2
    const-string v4, "application/manifest+json"
    aput-object v4, v1, v2
    const/4 v2, 0x7
    const-string v4, ".svg"
    aput-object v4, v0, v2
    const-string v4, "image/svg+xml"
    aput-object v4, v1, v2

    const/4 v2, 0x0
    :loop
    if-ge v2, v3, :none
    aget-object v4, v0, v2
    invoke-virtual {p0, v4}, Ljava/lang/String;->endsWith(Ljava/lang/String;)Z
    move-result v4
    if-eqz v4, :next
    aget-object v4, v1, v2
    return-object v4
    :next
    add-int/lit8 v2, v2, 0x1
    goto :loop
    :none
    const-string v4, "application/octet-stream"
    return-object v4
.end method

.method public shouldInterceptRequest(Landroid/webkit/WebView;Landroid/webkit/WebResourceRequest;)Landroid/webkit/WebResourceResponse;
    .registers 11
    # v0..v7 locals; p0 (v8): this, p1 (v9): the WebView, p2 (v10): the request
    invoke-interface {p2}, Landroid/webkit/WebResourceRequest;->getUrl()Landroid/net/Uri;
    move-result-object v0
    invoke-virtual {v0}, Landroid/net/Uri;->getHost()Ljava/lang/String;
    move-result-object v2
    const-string v1, "appassets.androidplatform.net"
    invoke-virtual {v1, v2}, Ljava/lang/String;->equals(Ljava/lang/Object;)Z
    move-result v1
    if-nez v1, :local
    const/4 v0, 0x0
    return-object v0

    :local
    invoke-virtual {v0}, Landroid/net/Uri;->getPath()Ljava/lang/String;
    move-result-object v1
    const/4 v2, 0x1
    invoke-virtual {v1, v2}, Ljava/lang/String;->substring(I)Ljava/lang/String;
    move-result-object v1
    invoke-virtual {v1}, Ljava/lang/String;->isEmpty()Z
    move-result v2
    if-nez v2, :directory
    const-string v2, "/"
    invoke-virtual {v1, v2}, Ljava/lang/String;->endsWith(Ljava/lang/String;)Z
    move-result v2
    if-eqz v2, :file
    :directory
    const-string v2, "index.html"
    invoke-virtual {v1, v2}, Ljava/lang/String;->concat(Ljava/lang/String;)Ljava/lang/String;
    move-result-object v1

    :file
    invoke-static {v1}, Lorg/edgespec/chat/AssetClient;->mimeType(Ljava/lang/String;)Ljava/lang/String;
    move-result-object v3
    :try_start
    iget-object v2, p0, Lorg/edgespec/chat/AssetClient;->assets:Landroid/content/res/AssetManager;
    invoke-virtual {v2, v1}, Landroid/content/res/AssetManager;->open(Ljava/lang/String;)Ljava/io/InputStream;
    move-result-object v2
    :try_end
    .catch Ljava/io/IOException; {:try_start .. :try_end} :missing
    new-instance v0, Landroid/webkit/WebResourceResponse;
    const/4 v4, 0x0
    invoke-direct {v0, v3, v4, v2}, Landroid/webkit/WebResourceResponse;-><init>(Ljava/lang/String;Ljava/lang/String;Ljava/io/InputStream;)V
    return-object v0

    :missing
    new-instance v0, Landroid/webkit/WebResourceResponse;
    const-string v1, "text/plain"
    const/4 v2, 0x0
    const/16 v3, 0x194
    const-string v4, "Not Found"
    const/4 v5, 0x0
    new-instance v6, Ljava/io/ByteArrayInputStream;
    new-array v7, v5, [B
    invoke-direct {v6, v7}, Ljava/io/ByteArrayInputStream;-><init>([B)V
    invoke-direct/range {v0 .. v6}, Landroid/webkit/WebResourceResponse;-><init>(Ljava/lang/String;Ljava/lang/String;ILjava/lang/String;Ljava/util/Map;Ljava/io/InputStream;)V
    return-object v0
.end method
