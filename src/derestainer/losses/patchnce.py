"""ASP's PatchNCE and adaptive supervised PatchNCE terms (written by the ASP baseline's work)."""
