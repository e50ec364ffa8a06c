"""The SimpleNorm Hessian bound: the note (simplenorm.md), its closed forms, numerical checks and verify-bound."""
