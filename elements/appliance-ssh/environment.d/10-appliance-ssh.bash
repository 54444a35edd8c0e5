# The break-glass account: a real shell with sudo, admitted by sshd only when
# the spec gives ssh.break_glass_keys. Set by the builder (appliance/spec.py).
export DIB_APPLIANCE_BREAK_GLASS_USER=${DIB_APPLIANCE_BREAK_GLASS_USER:-breakglass}
