# Kernel module trees (below kernel/) removed from the image.
export DIB_APPLIANCE_DROP_MODULES=${DIB_APPLIANCE_DROP_MODULES:-"sound drivers/gpu drivers/media drivers/net/wireless drivers/bluetooth net/bluetooth net/wireless net/mac80211 drivers/staging drivers/iio drivers/hid/amd-sfh-hid drivers/input/touchscreen drivers/input/joystick drivers/isdn drivers/infiniband/hw/hfi1 drivers/comedi"}
# The appliance configures networking itself (systemd-networkd).
export DIB_APT_MINIMAL_CREATE_INTERFACES=0
# Installed by stock elements for the build only; purged before the image is sealed.
export DIB_APPLIANCE_BUILD_ONLY_PACKAGES=${DIB_APPLIANCE_BUILD_ONLY_PACKAGES:-"locales gnupg2 gnupg dirmngr gpg-agent gpgsm gpg-wks-client gnupg-utils pinentry-curses rsync open-iscsi"}
