% rebase('base.tpl', title=title, wide=True, script='dashboard.js')
% live = caller.livemode
<header class="topbar">
  <nav aria-label="Dashboard">
    <a href="/dashboard/overview"{{!' aria-current="page"' if here == 'overview' else ''}}>Overview</a>
    <a href="/dashboard/pauses"{{!' aria-current="page"' if here == 'pauses' else ''}}>Pauses</a>
    <a href="/dashboard/audit"{{!' aria-current="page"' if here == 'audit' else ''}}>Audit log</a>
    <a href="/dashboard/webhooks"{{!' aria-current="page"' if here == 'webhooks' else ''}}>Webhooks</a>
    <a href="/dashboard/keys"{{!' aria-current="page"' if here == 'keys' else ''}}>Keys</a>
% if session.row['is_operator']:
    <a href="/dashboard/operator"{{!' aria-current="page"' if here == 'operator' else ''}}>Operator</a>
% end
  </nav>
  <form method="post" action="/dashboard/mode" class="mode">
    <input type="hidden" name="csrf" value="{{csrf}}">
    <input type="hidden" name="back" value="{{get('back', '/dashboard/' + here)}}">
    <input type="hidden" name="mode" value="{{'test' if live else 'live'}}">
    <span>Showing <strong>{{'live' if live else 'test'}}</strong> data</span>
    <button type="submit" class="secondary">Switch to {{'test' if live else 'live'}}</button>
  </form>
  <form method="post" action="/dashboard/logout" class="logout">
    <input type="hidden" name="csrf" value="{{csrf}}">
    <button type="submit" class="secondary">Log out {{session.row['email']}}</button>
  </form>
</header>
% if not live and here in ('overview', 'pauses', 'audit', 'webhooks'):
<p class="badge" id="test-mode">Test mode: your test key's data. Test pauses never text or email anyone; test webhooks are sent.</p>
% end
{{!base}}
