"""What several tests share: real processes (agent, sshd), the tiny guest, disk readers, waiting."""
