"""chmig: Cloud Hypervisor's live-migration protocol in Python, driving a real KVM guest."""

__version__ = "0.1.0"
