package android.app;

import android.os.Bundle;
import android.view.View;

public class Activity extends android.view.ContextThemeWrapper {
    protected void onCreate(Bundle savedInstanceState) {}
    public void setContentView(View view) {}
}
