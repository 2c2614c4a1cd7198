# The one activity: a WebView with JavaScript and DOM storage on, whose requests to
# https://appassets.androidplatform.net/ are answered from the APK's assets (AssetClient), showing the web app.
# Java equivalent:
#   protected void onCreate(Bundle state) {
#       super.onCreate(state);
#       WebView web = new WebView(this);
#       WebSettings settings = web.getSettings();
#       settings.setJavaScriptEnabled(true);
#       settings.setDomStorageEnabled(true);
#       web.setWebViewClient(new AssetClient(getAssets()));
#       setContentView(web);
#       web.loadUrl("https://appassets.androidplatform.net/web/index.html");
#   }
.class public Lorg/edgespec/chat/MainActivity;
.super Landroid/app/Activity;
.source "MainActivity.smali"

.method public constructor <init>()V
    .registers 1
    invoke-direct {p0}, Landroid/app/Activity;-><init>()V
    return-void
.end method

.method protected onCreate(Landroid/os/Bundle;)V
    .registers 5
    invoke-super {p0, p1}, Landroid/app/Activity;->onCreate(Landroid/os/Bundle;)V

    new-instance v0, Landroid/webkit/WebView;
    invoke-direct {v0, p0}, Landroid/webkit/WebView;-><init>(Landroid/content/Context;)V

    invoke-virtual {v0}, Landroid/webkit/WebView;->getSettings()Landroid/webkit/WebSettings;
    move-result-object v1
    const/4 v2, 0x1
    invoke-virtual {v1, v2}, Landroid/webkit/WebSettings;->setJavaScriptEnabled(Z)V
    invoke-virtual {v1, v2}, Landroid/webkit/WebSettings;->setDomStorageEnabled(Z)V

    new-instance v1, Lorg/edgespec/chat/AssetClient;
    invoke-virtual {p0}, Lorg/edgespec/chat/MainActivity;->getAssets()Landroid/content/res/AssetManager;
    move-result-object v2
    invoke-direct {v1, v2}, Lorg/edgespec/chat/AssetClient;-><init>(Landroid/content/res/AssetManager;)V
    invoke-virtual {v0, v1}, Landroid/webkit/WebView;->setWebViewClient(Landroid/webkit/WebViewClient;)V

    invoke-virtual {p0, v0}, Lorg/edgespec/chat/MainActivity;->setContentView(Landroid/view/View;)V

    const-string v1, "https://appassets.androidplatform.net/web/index.html"
    invoke-virtual {v0, v1}, Landroid/webkit/WebView;->loadUrl(Ljava/lang/String;)V
    return-void
.end method
