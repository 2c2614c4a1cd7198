package android.widget;

import android.content.Context;

public class AbsoluteLayout extends android.view.ViewGroup {
    public AbsoluteLayout(Context context) { super(context); }
}
