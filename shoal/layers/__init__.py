"""Shared building blocks that model families are assembled from: linear, attention, MoE, rotary, norm, embedding."""
