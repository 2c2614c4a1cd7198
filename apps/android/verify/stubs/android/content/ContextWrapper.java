package android.content;

import android.content.res.AssetManager;

public class ContextWrapper extends Context {
    public AssetManager getAssets() { throw new UnsupportedOperationException("stub"); }
}
