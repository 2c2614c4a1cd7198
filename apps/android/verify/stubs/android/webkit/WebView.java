package android.webkit;

import android.content.Context;

public class WebView extends android.widget.AbsoluteLayout {
    public WebView(Context context) { super(context); }
    public WebSettings getSettings() { throw new UnsupportedOperationException("stub"); }
    public void setWebViewClient(WebViewClient client) {}
    public void loadUrl(String url) {}
}
